/* PID 1 duties: the agent is the guest's init, so it mounts the basic filesystems, brings
 * up loopback, names the host, keeps a login shell on the serial console and reaps every
 * orphan. It must never exit: the kernel panics when PID 1 dies. */
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "agent.h"

#define CONSOLE_TTY "/dev/ttyS0"
#define RESPAWN_MS 1000

static int console_enabled = 1;
static pid_t console_pid;
static int64_t console_last_spawn = -RESPAWN_MS;

_Noreturn void power_off(void)
{
	sync();
	/* A restart, not RB_POWER_OFF: microvm has no ACPI, so power-off only halts the CPU and
	 * QEMU stays up; QEMU runs with -no-reboot, so a restart makes it exit (reboot=t keeps
	 * that to ~0.2 s). */
	reboot(RB_AUTOBOOT);
	/* reboot() only returns on failure; spinning beats exiting, which would panic. */
	for (;;)
		pause();
}

static void on_fatal(int sig)
{
	(void)sig;
	power_off();
}

static int is_mountpoint(const char *path)
{
	struct stat st, parent;
	char up[256];
	snprintf(up, sizeof up, "%s/..", path);
	if (stat(path, &st) < 0 || stat(up, &parent) < 0)
		return 0;
	return st.st_dev != parent.st_dev || st.st_ino == parent.st_ino;
}

static void mount_once(const char *src, const char *target, const char *type, unsigned long flags,
		       const char *data)
{
	mkdir(target, 0755);
	if (is_mountpoint(target))
		return;
	if (mount(src, target, type, flags, data) < 0)
		logmsg("mount %s on %s: %s", type, target, strerror(errno));
}

static void link_if_missing(const char *target, const char *path)
{
	struct stat st;
	if (lstat(path, &st) < 0 && symlink(target, path) < 0)
		logmsg("symlink %s: %s", path, strerror(errno));
}

static void loopback_up(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		/* The kernel gives lo 127.0.0.1/8 by itself once it is up. */
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
			logmsg("bring up lo: %s", strerror(errno));
	}
	close(fd);
}

/* `hutch` on every guest's PATH is this binary under another name (guestcli.c). The link
 * goes to wherever the image put the agent (/sbin in templates, /.hutch in OCI images), and
 * only there: an agent run as PID 1 of a namespace on some host (the tests) must not write
 * into that host's /usr. A file the image has at the link's place itself is left alone. */
int in_guest_image(void)
{
	char self[256];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n <= 0)
		return 0;
	self[n] = 0;
	/* /usr/sbin: /sbin is a link to usr/sbin in merged-/usr images (Debian's). */
	return strcmp(self, "/sbin/hutch-agent") == 0 || strcmp(self, "/usr/sbin/hutch-agent") == 0 ||
	       strcmp(self, "/.hutch/hutch-agent") == 0;
}

static void link_guest_cli(void)
{
	static const char path[] = "/usr/local/bin/hutch";
	char self[256], old[256];
	if (!in_guest_image())
		return;
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n <= 0)
		return;
	self[n] = 0;
	struct stat st;
	if (lstat(path, &st) == 0) {
		ssize_t k = S_ISLNK(st.st_mode) ? readlink(path, old, sizeof old - 1) : -1;
		if (k < 0 || ((size_t)k == (size_t)n && memcmp(old, self, (size_t)n) == 0))
			return;
		unlink(path); /* a link of an earlier agent path */
	}
	mkdir("/usr/local", 0755);
	mkdir("/usr/local/bin", 0755);
	if (symlink(self, path) < 0)
		logmsg("symlink %s: %s", path, strerror(errno));
}

/* The kernel arguments read at boot (docs/agent-protocol.md, "Boot parameters"): root= (the
 * device CONFIGURE's grow_root may grow) and hutch.console. Everything else about the guest
 * comes with CONFIGURE; hutch.hostname= and hutch.vol=, which protocol-1 agents read here,
 * are ignored (the host still writes hutch.vol= for them, see the docs). */
static void read_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = 0;
	const char *root = NULL;
	for (char *save = NULL, *tok = strtok_r(buf, " \t\n", &save); tok;
	     tok = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(tok, "root=", 5) == 0) {
			root = tok + 5;
		} else if (strcmp(tok, "hutch.console=0") == 0) {
			console_enabled = 0;
		}
	}
	set_root_device(root);
}

void init_setup(void)
{
	struct statvfs vfs;
	if (statvfs("/", &vfs) == 0 && (vfs.f_flag & ST_RDONLY) &&
	    mount(NULL, "/", NULL, MS_REMOUNT, NULL) < 0)
		logmsg("remount / read-write: %s", strerror(errno));

	mount_once("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_once("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_once("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount_once("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
	mount_once("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_once("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	mount_once("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	/* devtmpfs provides /dev/ptmx on current kernels; without it, the devpts one. */
	link_if_missing("pts/ptmx", "/dev/ptmx");
	link_if_missing("/proc/self/fd", "/dev/fd");
	link_if_missing("/proc/self/fd/0", "/dev/stdin");
	link_if_missing("/proc/self/fd/1", "/dev/stdout");
	link_if_missing("/proc/self/fd/2", "/dev/stderr");

	loopback_up();
	read_cmdline();
	link_guest_cli();

	signal(SIGTERM, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	static const int fatal[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
	for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++)
		signal(fatal[i], on_fatal);
}

static void spawn_console(void)
{
	const char *shell = access("/bin/bash", X_OK) == 0 ? "/bin/bash" : "/bin/sh";
	pid_t pid = fork();
	if (pid < 0) {
		logmsg("fork console shell: %s", strerror(errno));
		return;
	}
	if (pid > 0) {
		console_pid = pid;
		return;
	}
	reset_child_signals();
	setsid();
	/* Opening a tty as a session leader without one makes it the controlling tty;
	 * TIOCSCTTY says so explicitly. */
	int fd = open(CONSOLE_TTY, O_RDWR);
	if (fd < 0)
		_exit(1);
	ioctl(fd, TIOCSCTTY, 0);
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
	if (chdir("/root") < 0 && chdir("/") < 0)
		_exit(1);
	char *const argv[] = {(char *)shell, "-l", NULL};
	char *const envp[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			      "HOME=/root", "USER=root", "LOGNAME=root", "LANG=C.UTF-8",
			      "TERM=vt220", (char *)(shell[5] == 'b' ? "SHELL=/bin/bash" : "SHELL=/bin/sh"),
			      NULL};
	execve(shell, argv, envp);
	_exit(127);
}

int64_t console_tick(int64_t now)
{
	if (!console_enabled || console_pid > 0)
		return 0;
	int64_t due = console_last_spawn + RESPAWN_MS;
	if (now < due)
		return due;
	console_last_spawn = now;
	if (access(CONSOLE_TTY, F_OK) == 0)
		spawn_console();
	return console_pid > 0 ? 0 : now + RESPAWN_MS;
}

int console_reaped(pid_t pid)
{
	if (pid != console_pid || pid <= 0)
		return 0;
	console_pid = 0;
	return 1;
}
