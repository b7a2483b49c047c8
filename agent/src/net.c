/* CONFIGURE's `net` field (docs/agent-protocol.md, "Network"): the guest's IPv4 address on its
 * NIC, its default route and its DNS server. Done with ioctls rather than by running `ip`:
 * an OCI image may have no iproute2, and the agent must not depend on what an image brings. */
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define RESOLV_CONF "/etc/resolv.conf"

static uint32_t get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

const char *parse_net(const uint8_t *p, uint32_t n, struct net_config *c)
{
	if (n != NET_FIELD_LEN)
		return "net must be 15 bytes: address, prefix, gateway, mtu, dns";
	c->addr = get_be32(p);
	c->prefix = p[4];
	c->gateway = get_be32(p + 5);
	c->mtu = (uint16_t)(p[9] << 8 | p[10]);
	c->dns = get_be32(p + 11);
	if (c->prefix < 1 || c->prefix > 32)
		return "net prefix must be 1 to 32";
	if (c->mtu < 68)
		return "net mtu must be at least 68";
	if (!c->addr || !c->gateway || !c->dns)
		return "net address, gateway and dns must not be 0.0.0.0";
	uint32_t mask = c->prefix == 32 ? 0xffffffffu : ~(0xffffffffu >> c->prefix);
	/* The default route goes via the gateway, which must therefore be on the link. */
	if ((c->gateway & mask) != (c->addr & mask) || c->gateway == c->addr)
		return "net gateway must be another address of the guest's subnet";
	return NULL;
}

static void sin_of(struct sockaddr *sa, uint32_t host_order)
{
	struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr = {htonl(host_order)}};
	memcpy(sa, &in, sizeof in);
}

static int set_up(int fd, const char *name)
{
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	if ((ifr.ifr_flags & (IFF_UP | IFF_RUNNING)) == (IFF_UP | IFF_RUNNING))
		return 0;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	return ioctl(fd, SIOCSIFFLAGS, &ifr);
}

/* The NIC: the non-loopback interface with the lowest index (eth0, the virtio-net device). */
static int find_nic(int fd, char *name)
{
	struct if_nameindex *all = if_nameindex();
	if (!all)
		return -1;
	unsigned best = 0;
	for (struct if_nameindex *i = all; i->if_index; i++) {
		struct ifreq ifr = {0};
		snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", i->if_name);
		if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0 || (ifr.ifr_flags & IFF_LOOPBACK))
			continue;
		if (!best || i->if_index < best) {
			best = i->if_index;
			snprintf(name, IF_NAMESIZE, "%s", i->if_name);
		}
	}
	if_freenameindex(all);
	if (!best) {
		errno = ENODEV;
		return -1;
	}
	return 0;
}

static int default_route(int fd, const char *dev, uint32_t gateway, const char **what)
{
	/* A CONFIGURE after a restore finds the route of the one before, maybe via another
	 * gateway: every default route goes first, so the guest ends up with exactly one. */
	struct rtentry old = {0};
	sin_of(&old.rt_dst, 0);
	sin_of(&old.rt_genmask, 0);
	old.rt_flags = RTF_UP;
	*what = "SIOCDELRT default";
	for (int i = 0; i < 64 && ioctl(fd, SIOCDELRT, &old) == 0; i++) {
	}
	if (errno != ESRCH)
		return -1;
	struct rtentry rt = {0};
	sin_of(&rt.rt_dst, 0);
	sin_of(&rt.rt_genmask, 0);
	sin_of(&rt.rt_gateway, gateway);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = (char *)dev;
	*what = "SIOCADDRT default";
	return ioctl(fd, SIOCADDRT, &rt);
}

static int write_resolv_conf(uint32_t dns)
{
	if (mkdir("/etc", 0755) < 0 && errno != EEXIST)
		return -1;
	char line[64];
	struct in_addr a = {htonl(dns)};
	char ip[INET_ADDRSTRLEN];
	inet_ntop(AF_INET, &a, ip, sizeof ip);
	int n = snprintf(line, sizeof line, "nameserver %s\n", ip);
	/* The rename replaces a symlink there (systemd-resolved's stub) by the file itself. */
	return write_atomic(RESOLV_CONF, line, (size_t)n, 0644);
}

int apply_net(const struct net_config *c, const char **what)
{
	*what = "socket";
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	char dev[IF_NAMESIZE] = "";
	int rc = -1;
	struct ifreq ifr = {0};
	*what = "bring up lo";
	if (set_up(fd, "lo") < 0)
		goto out;
	*what = "find the network interface";
	if (find_nic(fd, dev) < 0)
		goto out;
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", dev);
	*what = "SIOCSIFADDR";
	sin_of(&ifr.ifr_addr, c->addr);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0)
		goto out;
	*what = "SIOCSIFNETMASK";
	sin_of(&ifr.ifr_netmask, c->prefix == 32 ? 0xffffffffu : ~(0xffffffffu >> c->prefix));
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
		goto out;
	*what = "SIOCSIFMTU";
	ifr.ifr_mtu = c->mtu;
	if (ioctl(fd, SIOCSIFMTU, &ifr) < 0)
		goto out;
	*what = "SIOCSIFFLAGS";
	if (set_up(fd, dev) < 0)
		goto out;
	if (default_route(fd, dev, c->gateway, what) < 0)
		goto out;
	*what = RESOLV_CONF;
	if (write_resolv_conf(c->dns) < 0)
		goto out;
	rc = 0;
out: {
	int saved = errno;
	close(fd);
	errno = saved;
	return rc;
}
}
