/* Disk work PID 1 does when CONFIGURE asks (docs/agent-protocol.md, CONFIGURE): grow the root
 * ext4 to fill its disk, and mount the host's 9p volumes. A failed grow is logged and never
 * answered (a machine with less space is still usable); a failed mount is the CONFIGURE's
 * ERROR. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "bootparam.h"

#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t)
#endif
/* linux/ext4.h (not in musl's headers): grow a mounted ext4 to this many blocks. */
#ifndef EXT4_IOC_RESIZE_FS
#define EXT4_IOC_RESIZE_FS _IOW('f', 16, uint64_t)
#endif

/* 9p's largest message is capped at 512000 bytes by Linux 6.1's virtio transport; the host
 * (src/vmm/volumes.ts) says so too. */
#define VOL_MSIZE 512000

static char root_dev[64];

void set_root_device(const char *dev)
{
	if (dev && strlen(dev) < sizeof root_dev)
		strcpy(root_dev, dev);
}

/* The device's size and its ext4's block size and count. 0, or -1 (not ext4, unreadable). */
static int read_sizes(const char *dev, uint64_t *dev_bytes, uint32_t *bsize, uint64_t *blocks)
{
	int fd = open(dev, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		logmsg("grow /: open %s: %s", dev, strerror(errno));
		return -1;
	}
	/* The block device's page cache holds the superblock ext4 writes: this is current. */
	uint8_t sb[1024];
	int ok = ioctl(fd, BLKGETSIZE64, dev_bytes) == 0 && pread(fd, sb, sizeof sb, 1024) == (ssize_t)sizeof sb &&
		 ext4_sb_blocks(sb, bsize, blocks) == 0;
	close(fd);
	return ok ? 0 : -1;
}

void grow_root(void)
{
	/* Only the device the kernel was told to mount as / (root=/dev/vda), and only if it is
	 * what / is on: the agent run as PID 1 of a namespace on some host (pid1-smoke.py) has no
	 * root= and must never touch that host's disk. */
	const char *dev = root_dev;
	struct stat root, st;
	if (strncmp(dev, "/dev/", 5) != 0 || stat("/", &root) < 0 || stat(dev, &st) < 0 ||
	    !S_ISBLK(st.st_mode) || st.st_rdev != root.st_dev)
		return;
	uint64_t dev_bytes, blocks, after;
	uint32_t bsize;
	if (read_sizes(dev, &dev_bytes, &bsize, &blocks) < 0)
		return; /* not ext4: nothing we know how to grow */
	uint64_t target = grow_target(dev_bytes, bsize, blocks);
	if (!target)
		return; /* already fills the disk: a restarted machine, a restored snapshot */
	int64_t t0 = now_ms();
	int rfd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (rfd < 0 || ioctl(rfd, EXT4_IOC_RESIZE_FS, &target) < 0)
		logmsg("grow / to %llu blocks: %s", (unsigned long long)target, strerror(errno));
	/* The kernel leaves out a last block group too small for its own metadata, so the count
	 * reached may be short of the target (and the next boot tries again, a no-op): report
	 * what the superblock says, and only a real change. */
	else if (read_sizes(dev, &dev_bytes, &bsize, &after) == 0 && after != blocks)
		logmsg("grew / from %llu to %llu blocks of %u in %lld ms", (unsigned long long)blocks,
		       (unsigned long long)after, bsize, (long long)(now_ms() - t0));
	if (rfd >= 0)
		close(rfd);
}

int mount_volume(const struct volume *vol, const char **what)
{
	struct volume v = *vol;
	*what = "mkdir";
	if (mkdir_p(v.path) < 0) {
		logmsg("volume %s: mkdir %s: %s", v.tag, v.path, strerror(errno));
		return -1;
	}
	/* cache=mmap: no page cache for reads and writes, so both sides see each other's changes
	 * at once (the host's files can change under the guest), yet shared mmap works (cache=none
	 * refuses writable shared mappings, which sqlite and friends need). nodev, nosuid: the host
	 * directory is data, not a place a guest's setuid bits or device nodes mean anything. */
	char opts[128];
	snprintf(opts, sizeof opts, "trans=virtio,version=9p2000.L,msize=%d,cache=mmap", VOL_MSIZE);
	unsigned long flags = MS_NODEV | MS_NOSUID | (v.readonly ? MS_RDONLY : 0);
	*what = "mount";
	if (mount(v.tag, v.path, "9p", flags, opts) < 0) {
		logmsg("volume %s: mount on %s: %s", v.tag, v.path, strerror(errno));
		return -1;
	}
	return 0;
}
