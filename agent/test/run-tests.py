#!/usr/bin/env python3
"""`make test`: runs the C vector test, then drives the real agent (`--connect SOCK`) over a
Unix socket like the host would. Prints a final `N passed, M failed` line."""
import argparse
import hashlib
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

PING, PONG, POWEROFF = 0x01, 0x02, 0x03
HELLO, UNSUPPORTED = 0x06, 0x07
EXEC, STARTED, STDIN, STDOUT, STDERR, SIGNAL, RESIZE, EXIT, ERROR, CREDIT = range(0x10, 0x1A)
FILE_WRITE, FILE_READ, DATA, DONE, CANCEL, CONFIGURE = 0x20, 0x21, 0x22, 0x23, 0x24, 0x25
API_OPEN = 0x28
PORT_OPEN = 0x29
DISK_MOUNT, DISK_UNMOUNT = 0x2A, 0x2B
AGENT_STREAM = 0x80000000
FEAT_GUEST_API = 1 << 7
AGENT_FEATURES = 0x7FF  # exec … guest-api (bits 0-7), port-forward (8), net (9), disks (10)
WINDOW = 262144
MAXP = 65536
TERMINAL = (EXIT, ERROR, DONE)


def frame(t, stream, payload=b""):
    return struct.pack(">IBI", 5 + len(payload), t, stream) + payload


def tlv(tag, value):
    if isinstance(value, str):
        value = value.encode()
    return struct.pack(">BI", tag, len(value)) + value


def parse_tlv(p):
    out, off = [], 0
    while off < len(p):
        tag, n = struct.unpack_from(">BI", p, off)
        off += 5
        out.append((tag, p[off:off + n]))
        off += n
    return out


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


class Host:
    """The host end of one agent: accepts its connections, checks every frame it sends
    against the protocol (framing, windows), and sorts frames by stream."""

    def __init__(self, agent, workdir):
        self.path = os.path.join(workdir, "agent.sock")
        self.api_path = os.path.join(workdir, "api.sock")
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.path)
        self.lsock.listen(4)
        self.log = open(os.path.join(workdir, "agent.log"), "wb")
        self.proc = subprocess.Popen(self.argv(agent), stdout=self.log, stderr=self.log)
        self.conn = None
        self.next_id = 1
        self.accept()

    def argv(self, agent):
        return [agent, "--connect", self.path, "--api-socket", self.api_path]

    def accept(self, timeout=5):
        self.lsock.settimeout(timeout)
        self.conn, _ = self.lsock.accept()
        self.conn.setblocking(False)
        self.buf = b""
        self.outbox = bytearray()
        self.sending = False
        self.frames = {}      # stream -> list of (type, payload)
        self.recv_win = {}    # stream -> bytes the agent may still send us
        self.send_win = {}    # stream -> bytes we may still send the agent
        self.autocredit = set()
        self.received = {}    # stream -> total payload bytes received
        self.opened = []      # streams the agent opened (API_OPEN), in order
        self.handshake()

    def handshake(self):
        nonce = os.urandom(16)
        self.sendf(PING, 0, nonce)
        want = frame(PONG, 0, nonce)
        deadline = time.time() + 5
        data = b""
        while want not in data:
            check(time.time() < deadline, "no PONG")
            r, _, _ = select.select([self.conn], [], [], 0.1)
            if r:
                chunk = self.conn.recv(65536)
                check(chunk, "agent closed during handshake")
                data += chunk
        self.buf = data[data.index(want) + len(want):]

    def close(self):
        if self.conn:
            self.conn.close()
        self.conn = None

    def sendall(self, data):
        # pump() below may credit streams, which sends too: queue, so that frames are never
        # interleaved, and let only the outermost call write.
        self.outbox += data
        if self.sending:
            return
        self.sending = True
        try:
            while self.outbox:
                try:
                    n = self.conn.send(self.outbox)
                    del self.outbox[:n]
                except BlockingIOError:
                    # Keep reading while the agent cannot take more, as a real host would.
                    self.pump(0.01)
        finally:
            self.sending = False

    def sendf(self, t, stream, payload=b""):
        self.sendall(frame(t, stream, payload))

    def new_stream(self):
        sid = self.next_id
        self.next_id += 1
        self.frames[sid] = []
        self.recv_win[sid] = WINDOW
        self.send_win[sid] = WINDOW
        self.received[sid] = 0
        return sid

    def credit(self, sid, n):
        self.recv_win[sid] += n
        self.sendf(CREDIT, sid, struct.pack(">I", n))

    def pump(self, timeout):
        """Reads what the agent sent within `timeout` seconds; returns whether anything came."""
        r, _, _ = select.select([self.conn], [], [], timeout)
        if not r:
            return False
        try:
            chunk = self.conn.recv(1 << 20)
        except BlockingIOError:
            return False
        check(chunk, "agent closed the connection")
        self.buf += chunk
        while len(self.buf) >= 4:
            (n,) = struct.unpack_from(">I", self.buf)
            check(5 <= n <= 5 + MAXP, "bad frame length %d from agent" % n)
            if len(self.buf) < 4 + n:
                break
            t, sid = struct.unpack_from(">BI", self.buf, 4)
            payload = self.buf[9:4 + n]
            self.buf = self.buf[4 + n:]
            self.on_frame(t, sid, payload)
        return True

    def on_frame(self, t, sid, payload):
        check(t in (PONG, HELLO, UNSUPPORTED, STARTED, STDOUT, STDERR, EXIT, ERROR, CREDIT, DATA, DONE, API_OPEN,
                    PORT_OPEN),
              "agent sent frame type 0x%02x" % t)
        if t == API_OPEN:
            check(sid & AGENT_STREAM, "API_OPEN on host stream id %d" % sid)
            check(sid not in self.frames, "API_OPEN reuses stream %d" % sid)
            self.frames[sid] = []
            self.recv_win[sid] = WINDOW
            self.send_win[sid] = WINDOW
            self.received[sid] = 0
            self.autocredit.add(sid)
            self.opened.append(sid)
            return
        if t in (PONG, HELLO, UNSUPPORTED):
            check(sid == 0, "frame 0x%02x on stream %d" % (t, sid))
            self.frames.setdefault(0, []).append((t, payload))
            return
        check(sid in self.frames, "frame 0x%02x for unknown stream %d" % (t, sid))
        if t == CREDIT:
            self.send_win[sid] += struct.unpack(">I", payload)[0]
            return
        if t in (STDOUT, STDERR, DATA):
            self.recv_win[sid] -= len(payload)
            self.received[sid] += len(payload)
            check(self.recv_win[sid] >= 0, "agent overran the window of stream %d" % sid)
            if sid in self.autocredit and payload:
                self.credit(sid, len(payload))
        self.frames[sid].append((t, payload))

    def wait_end(self, sid, timeout=10):
        deadline = time.time() + timeout
        while not any(t in TERMINAL for t, _ in self.frames[sid]):
            check(time.time() < deadline, "stream %d did not end; got %s" % (
                sid, [hex(t) for t, _ in self.frames[sid]][-10:]))
            self.pump(0.05)
        return self.frames[sid]

    def send_data(self, sid, t, data):
        """Sends STDIN/DATA within the agent's window, waiting for its CREDIT."""
        off = 0
        deadline = time.time() + 30
        while off < len(data):
            win = self.send_win[sid]
            if win == 0:
                check(time.time() < deadline, "no CREDIT from agent")
                self.pump(0.05)
                continue
            n = min(MAXP, win, len(data) - off)
            self.sendf(t, sid, data[off:off + n])
            self.send_win[sid] -= n
            off += n
            self.pump(0)
        self.sendf(t, sid, b"")

    def exec(self, args, env=(), cwd=None, pty=None, timeout_ms=None, stdin=False, autocredit=True):
        sid = self.new_stream()
        p = b"".join(tlv(1, a) for a in args) + b"".join(tlv(2, e) for e in env)
        if cwd is not None:
            p += tlv(3, cwd)
        if pty is not None:
            p += tlv(4, struct.pack(">HH", *pty))
        if timeout_ms is not None:
            p += tlv(5, struct.pack(">I", timeout_ms))
        p += tlv(6, b"\x01" if stdin else b"\x00")
        if autocredit:
            self.autocredit.add(sid)
        self.sendf(EXEC, sid, p)
        return sid

    def wait_started(self, sid, timeout=5):
        deadline = time.time() + timeout
        while not self.frames[sid]:
            check(time.time() < deadline, "no STARTED")
            self.pump(0.05)
        t, p = self.frames[sid][0]
        check(t == STARTED, "expected STARTED, got 0x%02x %r" % (t, p))
        return struct.unpack(">I", p)[0]


def collect(frames):
    """stdout, stderr, terminal frame type, its fields."""
    out = b"".join(p for t, p in frames if t == STDOUT)
    err = b"".join(p for t, p in frames if t == STDERR)
    last_t, last_p = frames[-1]
    check(last_t in TERMINAL, "stream did not end")
    check(all(t not in TERMINAL for t, _ in frames[:-1]), "frames after the terminal frame")
    return out, err, last_t, dict(parse_tlv(last_p))


def u32(b):
    return struct.unpack(">I", b)[0]


def run(h, args, **kw):
    sid = h.exec(args, **kw)
    return collect(h.wait_end(sid))


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone, possibly between open() and read()
        return False


# ---- tests ----

def t_ping(h):
    for nonce in (b"", b"x", os.urandom(16), bytes(range(64))):
        h.sendf(PING, 0, nonce)
        deadline = time.time() + 3
        while not h.frames.get(0):
            check(time.time() < deadline, "no PONG")
            h.pump(0.05)
        t, p = h.frames[0].pop(0)
        check(t == PONG and p == nonce, "PONG nonce differs")


def t_echo(h):
    sid = h.exec(["echo", "hi"])
    frames = h.wait_end(sid)
    check(frames[0][0] == STARTED and u32(frames[0][1]) > 0, "first frame is not STARTED")
    out, err, t, f = collect(frames)
    check(out == b"hi\n", "stdout %r" % out)
    check(err == b"", "stderr %r" % err)
    check(t == EXIT and u32(f[1]) == 0 and 2 not in f and 3 not in f, "exit %r" % f)


def t_stderr(h):
    out, err, t, f = run(h, ["sh", "-c", "echo out; echo err >&2; echo out2"])
    check(out == b"out\nout2\n" and err == b"err\n", "out %r err %r" % (out, err))


def t_exit_code(h):
    out, err, t, f = run(h, ["sh", "-c", "exit 3"])
    check(t == EXIT and u32(f[1]) == 3, "exit %r" % f)


def t_env_cwd(h):
    out, _, t, f = run(h, ["sh", "-c", 'echo "$FOO|$HOME|$USER|$LANG|$TERM|$PATH"; pwd'],
                       env=["FOO=one", "HOME=/tmp", "FOO=two"], cwd="/")
    check(out == b"two|/tmp|root|C.UTF-8||/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/\n",
          "output %r" % out)


def t_stdin_cat(h):
    data = os.urandom(3 * 1024 * 1024 + 17)
    sid = h.exec(["cat"], stdin=True)
    h.wait_started(sid)
    h.send_data(sid, STDIN, data)
    out, err, t, f = collect(h.wait_end(sid, 30))
    check(out == data, "cat returned %d bytes, sent %d" % (len(out), len(data)))
    check(t == EXIT and u32(f[1]) == 0, "exit %r" % f)


def t_stdin_devnull(h):
    out, _, t, f = run(h, ["sh", "-c", "cat; echo end"])
    check(out == b"end\n", "output %r" % out)


def t_flow_control(h):
    total = 10 * 1024 * 1024
    sid = h.exec(["sh", "-c", "yes abcdefghij | head -c %d" % total], autocredit=False)
    deadline = time.time() + 10
    while h.received[sid] < WINDOW:
        check(time.time() < deadline, "only %d bytes before credit" % h.received[sid])
        h.pump(0.05)
    end = time.time() + 0.5
    while time.time() < end:
        h.pump(0.05)
    check(h.received[sid] == WINDOW, "agent sent %d bytes on a %d window" % (h.received[sid], WINDOW))
    check(not any(t == EXIT for t, _ in h.frames[sid]), "exited without credit")
    h.autocredit.add(sid)
    h.credit(sid, WINDOW - h.recv_win[sid])
    out, _, t, f = collect(h.wait_end(sid, 60))
    want = hashlib.sha256((b"abcdefghij\n" * (total // 11 + 1))[:total]).hexdigest()
    check(len(out) == total, "got %d bytes" % len(out))
    check(hashlib.sha256(out).hexdigest() == want, "checksum differs")
    check(t == EXIT and u32(f[1]) == 0, "exit %r" % f)


def t_timeout(h):
    start = time.time()
    out, _, t, f = run(h, ["sleep", "100"], timeout_ms=300)
    took = time.time() - start
    check(t == EXIT and u32(f.get(2, b"\0\0\0\0")) == 9 and f.get(3) == b"\x01", "exit %r" % f)
    check(took < 3, "took %.1fs" % took)


def t_enoent(h):
    _, _, t, f = run(h, ["no-such-program-hutch"])
    check(t == ERROR and f[1] == b"ENOENT", "got %r" % f)
    _, _, t, f = run(h, ["true"], cwd="/no/such/dir")
    check(t == ERROR and f[1] == b"ENOENT", "cwd: got %r" % f)


def t_einval(h):
    sid = h.new_stream()
    h.sendf(EXEC, sid, tlv(2, "A=1"))
    _, _, t, f = collect(h.wait_end(sid))
    check(t == ERROR and f[1] == b"EINVAL", "got %r" % f)


def t_signal(h):
    sid = h.exec(["sleep", "100"])
    h.wait_started(sid)
    h.sendf(SIGNAL, sid, b"\x0f")
    _, _, t, f = collect(h.wait_end(sid))
    check(t == EXIT and u32(f[2]) == 15 and 3 not in f, "exit %r" % f)


def t_cancel(h):
    sid = h.exec(["sh", "-c", "echo $$; exec sleep 100"])
    pid = h.wait_started(sid)
    deadline = time.time() + 5
    while not any(t == STDOUT for t, _ in h.frames[sid]):
        check(time.time() < deadline, "no output")
        h.pump(0.05)
    h.sendf(CANCEL, sid)
    deadline = time.time() + 3
    while pid_alive(pid):
        check(time.time() < deadline, "cancelled process still alive")
        h.pump(0.05)
    h.pump(0.3)
    check(not any(t in TERMINAL for t, _ in h.frames[sid]), "frames after CANCEL")


def t_background_holder(h):
    start = time.time()
    out, _, t, f = run(h, ["sh", "-c", "sleep 3 & echo done"])
    check(time.time() - start < 2, "EXIT waited for the background process")
    check(out == b"done\n" and t == EXIT and u32(f[1]) == 0, "got %r %r" % (out, f))


def t_pty(h):
    sid = h.exec(["sh", "-c", "read x; stty size; echo \"$TERM\"; [ -t 0 ] && echo tty"],
                 pty=(80, 24), stdin=True)
    h.wait_started(sid)
    h.sendf(RESIZE, sid, struct.pack(">HH", 100, 30))
    h.sendf(STDIN, sid, b"go\n")
    out, err, t, f = collect(h.wait_end(sid))
    check(b"30 100\r\n" in out, "stty size output %r" % out)
    check(b"xterm-256color\r\n" in out and b"tty\r\n" in out, "output %r" % out)
    check(err == b"" and t == EXIT and u32(f[1]) == 0, "exit %r" % f)


def t_concurrent(h):
    n = 60
    sids = [h.exec(["sh", "-c", "echo start %d; sleep 0.3; head -c 100000 /dev/zero; echo end %d" % (i, i)])
            for i in range(n)]
    start = time.time()
    for i, sid in enumerate(sids):
        out, _, t, f = collect(h.wait_end(sid, 30))
        want = ("start %d\n" % i).encode() + b"\0" * 100000 + ("end %d\n" % i).encode()
        check(out == want and t == EXIT and u32(f[1]) == 0, "stream %d: %d bytes %r" % (i, len(out), f))
    check(time.time() - start < 10, "execs did not run concurrently")


def write_file(h, path, data, mode=None, mkdirs=False):
    sid = h.new_stream()
    p = tlv(1, path)
    if mode is not None:
        p += tlv(2, struct.pack(">I", mode))
    if mkdirs:
        p += tlv(3, b"\x01")
    h.sendf(FILE_WRITE, sid, p)
    h.send_data(sid, DATA, data)
    return collect(h.wait_end(sid, 30))


def read_file(h, path):
    sid = h.new_stream()
    h.autocredit.add(sid)
    h.sendf(FILE_READ, sid, tlv(1, path))
    frames = h.wait_end(sid, 30)
    _, _, t, f = collect(frames)
    datas = [p for tt, p in frames if tt == DATA]
    if t == DONE:
        check(datas and datas[-1] == b"" and all(datas[:-1]), "DATA frames must end with one empty DATA")
    else:
        check(not datas, "DATA before ERROR")
    return b"".join(datas), t, f


def t_files(h, tmp):
    data = os.urandom(5 * 1024 * 1024 + 3)
    path = os.path.join(tmp, "a", "b c", "file.bin")
    _, _, t, f = write_file(h, path, data, mode=0o600, mkdirs=True)
    check(t == DONE, "write ended with %r" % f)
    check(struct.unpack(">Q", f[1])[0] == len(data) and u32(f[2]) == 0o600, "DONE %r" % f)
    with open(path, "rb") as fp:
        check(hashlib.sha256(fp.read()).digest() == hashlib.sha256(data).digest(), "file on disk differs")
    check(os.stat(path).st_mode & 0o7777 == 0o600, "mode on disk")
    check(os.listdir(os.path.dirname(path)) == ["file.bin"], "temporary file left behind")
    got, t, f = read_file(h, path)
    check(t == DONE and hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), "read back differs")
    check(struct.unpack(">Q", f[1])[0] == len(data) and u32(f[2]) == 0o600, "DONE %r" % f)
    # empty file, overwrite, default mode
    _, _, t, f = write_file(h, path, b"")
    check(t == DONE and struct.unpack(">Q", f[1])[0] == 0 and u32(f[2]) == 0o644, "empty write %r" % f)
    got, t, f = read_file(h, path)
    check(t == DONE and got == b"", "empty read")


def t_file_errors(h, tmp):
    _, t, f = read_file(h, os.path.join(tmp, "missing"))
    check(t == ERROR and f[1] == b"ENOENT", "missing: %r" % f)
    _, t, f = read_file(h, tmp)
    check(t == ERROR and f[1] == b"EISDIR", "dir: %r" % f)
    _, _, t, f = write_file(h, os.path.join(tmp, "nodir", "x"), b"abc")
    check(t == ERROR and f[1] == b"ENOENT", "write without mkdirs: %r" % f)
    _, _, t, f = write_file(h, tmp, b"abc")
    check(t == ERROR and f[1] == b"EISDIR", "write over dir: %r" % f)
    open(os.path.join(tmp, "plain"), "w").close()
    _, _, t, f = write_file(h, os.path.join(tmp, "plain", "x"), b"abc", mkdirs=True)
    check(t == ERROR and f[1] == b"ENOTDIR", "write under a file: %r" % f)
    _, t, f = read_file(h, "relative/path")
    check(t == ERROR and f[1] == b"EINVAL", "relative: %r" % f)


def t_file_cancel(h, tmp):
    path = os.path.join(tmp, "cancelled")
    sid = h.new_stream()
    h.sendf(FILE_WRITE, sid, tlv(1, path))
    h.sendf(DATA, sid, b"partial")
    h.sendf(CANCEL, sid)
    t_ping(h)  # the agent has processed everything before this
    check(os.listdir(tmp) == [], "cancelled write left %r" % os.listdir(tmp))


def configure(h, payload):
    """Sends CONFIGURE; returns the stream's frames (one DONE or one ERROR)."""
    sid = h.new_stream()
    h.sendf(CONFIGURE, sid, payload)
    frames = h.wait_end(sid)
    check(len(frames) == 1, "CONFIGURE answered with %d frames" % len(frames))
    return frames[0]


def host_identity():
    with open("/etc/machine-id", "rb") as f:
        mid = f.read()
    st = os.stat("/etc/machine-id")
    return socket.gethostname(), mid, st.st_mtime_ns, st.st_ino


def t_configure(h):
    """--connect mode: the request is validated exactly as in PID 1 mode, but nothing is
    applied to the machine the tests run on (its hostname and /etc/machine-id stay)."""
    before = host_identity()
    ns = struct.pack(">Q", time.time_ns() + 3600 * 10**9)
    mid = b"0123456789abcdef0123456789abcdef"
    for payload in (tlv(1, "clone-1.test") + tlv(4, mid) + tlv(3, os.urandom(32)) + tlv(2, ns),
                    b"", tlv(1, "a" * 64), tlv(3, os.urandom(512)), tlv(3, b"x"), tlv(1, "A-Z.0-9"),
                    tlv(2, b"\0" * 8), tlv(9, "from the future") + tlv(1, "vm")):
        t, p = configure(h, payload)
        check(t == DONE and p == b"", "valid request %r: got 0x%02x %r" % (payload[:40], t, p))
    bad = [
        ("empty hostname", tlv(1, "")), ("65-byte hostname", tlv(1, "a" * 65)),
        ("underscore", tlv(1, "bad_name")), ("space", tlv(1, "a b")), ("NUL", tlv(1, b"a\0b")),
        ("UTF-8", tlv(1, "h\u00e9te")), ("empty entropy", tlv(3, b"")),
        ("513 bytes of entropy", tlv(3, b"\0" * 513)), ("upper-case machine id", tlv(4, mid.upper())),
        ("31-digit machine id", tlv(4, mid[:31])), ("33-digit machine id", tlv(4, mid + b"0")),
        ("non-hex machine id", tlv(4, b"g" + mid[1:])),
        ("repeated hostname", tlv(1, "a") + tlv(1, "a")),
        ("repeated time_ns", tlv(2, ns) + tlv(1, "vm") + tlv(2, ns)),
        ("repeated entropy", tlv(3, b"x") + tlv(3, b"y")),
        ("repeated machine_id", tlv(4, mid) + tlv(4, mid)),
        ("bad field after good ones", tlv(1, "ok") + tlv(4, mid) + tlv(3, b"")),
    ]
    for what, payload in bad:
        t, p = configure(h, payload)
        f = dict(parse_tlv(p))
        check(t == ERROR and f.get(1) == b"EINVAL" and f.get(2, b"").startswith(b"configure: "),
              "%s: got 0x%02x %r" % (what, t, f))
    check(host_identity() == before, "CONFIGURE in --connect mode changed the host: %r -> %r"
          % (before, host_identity()))
    t_ping(h)


def t_disconnect(h):
    sid = h.exec(["sh", "-c", "sleep 100 & echo $!; wait"])
    pid = h.wait_started(sid)
    deadline = time.time() + 5
    while not any(t == STDOUT for t, _ in h.frames[sid]):
        check(time.time() < deadline, "no output")
        h.pump(0.05)
    bg = int(b"".join(p for t, p in h.frames[sid] if t == STDOUT).strip())
    check(pid_alive(pid) and pid_alive(bg), "children not running")
    h.close()
    deadline = time.time() + 3
    while pid_alive(pid) or pid_alive(bg):
        check(time.time() < deadline, "children survived the disconnect")
        time.sleep(0.05)
    h.accept()


def wait_conn_frame(h, t):
    deadline = time.time() + 3
    while True:
        for i, (ft, p) in enumerate(h.frames.get(0, [])):
            if ft == t:
                del h.frames[0][i]
                return p
        check(time.time() < deadline, "no frame 0x%02x" % t)
        h.pump(0.05)


def t_hello(h):
    h.sendall(frame(HELLO, 0, tlv(1, struct.pack(">I", 2)) + tlv(2, struct.pack(">Q", 1 << 63)) + tlv(9, "x")))
    f = dict(parse_tlv(wait_conn_frame(h, HELLO)))
    check(f.get(1) == struct.pack(">I", 3), "HELLO version %r" % f.get(1))
    check(f.get(2) == struct.pack(">Q", AGENT_FEATURES), "HELLO features %r" % f.get(2))
    t_echo(h)


def t_unsupported(h):
    # A newer host's frames are skipped whole and answered; nothing else is disturbed.
    sid = h.exec(["sh", "-c", "echo $$; exec sleep 100"])
    pid = h.wait_started(sid)
    h.sendall(frame(0x7E, 0, b"x" * 1000) + frame(0x31, 4242))
    f1 = dict(parse_tlv(wait_conn_frame(h, UNSUPPORTED)))
    f2 = dict(parse_tlv(wait_conn_frame(h, UNSUPPORTED)))
    check(f1 == {1: b"\x7e"} and f2 == {1: b"\x31", 2: struct.pack(">I", 4242)}, "UNSUPPORTED %r %r" % (f1, f2))
    check(pid_alive(pid), "an unknown frame killed an exec")
    t_echo(h)
    h.sendall(frame(CANCEL, sid))


def t_violation(h):
    sid = h.exec(["sh", "-c", "echo $$; exec sleep 100"])
    pid = h.wait_started(sid)
    h.sendall(struct.pack(">IBI", 0x7FFFFFFF, STDIN, sid) + b"garbage\x00\x00")
    deadline = time.time() + 3
    while pid_alive(pid):
        check(time.time() < deadline, "exec survived a protocol violation")
        time.sleep(0.05)
    # Resync: the next PING is answered; the reset must not leave half frames behind.
    h.frames = {}
    h.handshake()
    t_echo(h)


# ---- guest API (API_OPEN) and the guest CLI ----

def announce(h, features):
    h.sendall(frame(HELLO, 0, tlv(1, struct.pack(">I", 3)) + tlv(2, struct.pack(">Q", features))))
    wait_conn_frame(h, HELLO)


def api_client():
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(h_api_path[0])
    return c


def wait_open(h, timeout=5):
    deadline = time.time() + timeout
    while not h.opened:
        check(time.time() < deadline, "no API_OPEN")
        h.pump(0.05)
    return h.opened.pop(0)


def stream_bytes(h, sid, until_eof=True, timeout=10):
    """The DATA bytes of an agent stream, up to its empty DATA."""
    deadline = time.time() + timeout
    while True:
        data = [p for t, p in h.frames[sid] if t == DATA]
        if any(t == ERROR for t, _ in h.frames[sid]):
            raise Fail("API stream %d ended with ERROR %r" % (sid, h.frames[sid][-1]))
        if not until_eof or (data and data[-1] == b""):
            return b"".join(data)
        check(time.time() < deadline, "API stream %d did not end" % sid)
        h.pump(0.05)


def read_all(c, timeout=10):
    c.settimeout(timeout)
    out = b""
    while True:
        b = c.recv(65536)
        if not b:
            return out
        out += b


def t_api_without_feature(h):
    # A host that did not announce guest-api: the client's connection closes unanswered.
    announce(h, 0x7F)
    c = api_client()
    check(read_all(c, 3) == b"", "a connection was served without the host's feature")
    c.close()
    h.pump(0.1)
    check(not h.opened, "API_OPEN sent to a host without guest-api")


def t_api_roundtrip(h):
    announce(h, 0xFF)
    c = api_client()
    c.sendall(b"GET /v1/machines HTTP/1.1\r\nHost: hutch\r\n\r\n")
    sid = wait_open(h)
    deadline = time.time() + 5
    while stream_bytes(h, sid, until_eof=False) != b"GET /v1/machines HTTP/1.1\r\nHost: hutch\r\n\r\n":
        check(time.time() < deadline, "request bytes did not arrive")
        h.pump(0.05)
    h.send_data(sid, DATA, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    check(read_all(c) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "answer not delivered")
    c.close()
    stream_bytes(h, sid)  # the client's end arrives as an empty DATA


def t_api_flow_5mb(h):
    """5 MB each way through one stream: both windows are honoured, nothing is lost."""
    announce(h, 0xFF)
    import threading
    up = os.urandom(5 * 1000 * 1000)
    down = os.urandom(5 * 1000 * 1000)
    got = {}
    c = api_client()

    def client():
        c.sendall(up)
        got["down"] = read_all(c, 30)
    th = threading.Thread(target=client)
    th.start()
    sid = wait_open(h)
    h.send_data(sid, DATA, down)
    deadline = time.time() + 30
    while h.received[sid] < len(up):
        check(time.time() < deadline, "upload stalled at %d" % h.received[sid])
        h.pump(0.05)
    th.join(30)
    check(got.get("down") == down, "download corrupted (%d bytes)" % len(got.get("down", b"")))
    check(stream_bytes(h, sid, until_eof=False) == up, "upload corrupted")
    c.close()
    stream_bytes(h, sid)


def t_api_cancel(h):
    announce(h, 0xFF)
    c = api_client()
    sid = wait_open(h)
    h.sendf(CANCEL, sid)
    check(read_all(c, 3) == b"", "client still connected after CANCEL")
    c.close()


def t_api_limit(h):
    """At most 16 streams at once; the rest wait in the backlog and are opened as others end."""
    announce(h, 0xFF)
    clients = [api_client() for _ in range(20)]
    deadline = time.time() + 3
    while len(h.opened) < 16 and time.time() < deadline:
        h.pump(0.05)
    h.pump(0.3)
    check(len(h.opened) == 16, "%d streams open, want 16" % len(h.opened))
    first = h.opened[:4]
    del h.opened[:4]
    for sid in first:
        h.sendf(CANCEL, sid)
    deadline = time.time() + 3
    while len(h.opened) < 16:
        check(time.time() < deadline, "waiting connections were not opened (%d)" % len(h.opened))
        h.pump(0.05)
    for sid in h.opened:
        h.sendf(CANCEL, sid)
    h.opened = []
    for c in clients:
        c.close()


def run_cli(h, tmp, args, answer):
    """Runs the agent as `hutch ARGS` against the API socket; answers its one request with
    `answer` (bytes of an HTTP response). Returns (exit code, stdout, stderr, request)."""
    link = os.path.join(tmp, "hutch")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(h.proc.args[0]), link)
    env = dict(os.environ, HUTCH_API_SOCKET=h.api_path)
    p = subprocess.Popen([link] + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    req = b""
    if answer is not None:
        sid = wait_open(h)
        deadline = time.time() + 5
        while True:
            req = stream_bytes(h, sid, until_eof=False)
            head, sep, body = req.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length: (\d+)", head)
            if sep and len(body) >= (int(m.group(1)) if m else 0):
                break
            check(time.time() < deadline, "incomplete request %r" % req)
            h.pump(0.05)
        h.send_data(sid, DATA, answer)
    out, err = p.communicate(timeout=10)
    return p.returncode, out, err, req


def http(status, body, chunked=False):
    reason = {200: "OK", 201: "Created", 204: "No Content", 404: "Not Found"}[status]
    if chunked:
        mid = len(body) // 2
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in (body[:mid], body[mid:]) if x)
        return b"HTTP/1.1 %d %s\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (status, reason.encode(), chunks)
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body)


def t_guest_cli(h, tmp):
    import json
    announce(h, 0xFF)
    res = (b'{"exit_code":0,"signal":null,"timed_out":false,"stdout":"hi \\"q\\" \\u00e9\\ud83d\\ude00\\n",'
           b'"stderr":"warn\\n","truncated":false,"duration_ms":3}')
    code, out, err, req = run_cli(h, tmp, ["exec", "sib", "--json", "echo hi"], http(200, res, chunked=True))
    check(code == 0, "exit %d: %r" % (code, err))
    check(req.startswith(b"POST /v1/machines/sib/exec HTTP/1.1\r\n"), "request %r" % req)
    check(json.loads(req.partition(b"\r\n\r\n")[2]) == {"cmd": "echo hi", "timeout_ms": 3600000}, "body %r" % req)
    doc = json.loads(out)
    check(doc["output"] == 'hi "q" \u00e9\U0001F600\nwarn\n', "output %r" % doc["output"])
    check(doc["stdout"] == 'hi "q" \u00e9\U0001F600\n' and doc["exit_code"] == 0 and doc["duration_ms"] == 3, "doc %r" % doc)
    check(list(doc)[:2] == ["output", "exit_code"], "key order %r" % list(doc))

    # Without --json: the bytes, and the command's exit code.
    res = b'{"exit_code":3,"signal":null,"timed_out":false,"stdout":"a\\u00e9\\n","stderr":"b\\n","truncated":false,"duration_ms":1}'
    code, out, err, req = run_cli(h, tmp, ["exec", "m-1", "--", "sh", "-c", "exit 3"], http(200, res))
    check((code, out, err) == (3, "a\u00e9\n".encode(), b"b\n"), "plain exec %r" % ((code, out, err),))
    check(json.loads(req.partition(b"\r\n\r\n")[2])["cmd"] == ["sh", "-c", "exit 3"], "argv form %r" % req)

    # Errors: the daemon's document as it came, exit 1.
    e = b'{"code":"MACHINE_NOT_FOUND","message":"no machine \\"nope\\""}'
    code, out, err, req = run_cli(h, tmp, ["destroy", "--json", "nope"], http(404, e))
    check(code == 1 and json.loads(out)["code"] == "MACHINE_NOT_FOUND", "error %r" % ((code, out),))
    check(req.startswith(b"DELETE /v1/machines/nope HTTP/1.1"), "request %r" % req)
    check(b'MACHINE_NOT_FOUND: no machine "nope"' in err, "stderr %r" % err)

    # new: --name=x and --name x; without --ttl, persistent with the longest TTL.
    m = b'{"id":"m-0000abcd","name":"sib","status":"running","template":"python"}'
    code, out, err, req = run_cli(h, tmp, ["new", "--name", "sib", "--json"], http(201, m))
    check(code == 0 and json.loads(out)["id"] == "m-0000abcd", "new %r" % ((code, out, err),))
    check(json.loads(req.partition(b"\r\n\r\n")[2]) ==
          {"template": "python", "name": "sib", "persistent": True, "ttl_seconds": 900}, "new body %r" % req)
    code, out, err, req = run_cli(h, tmp, ["fork", "sib", "--name=sib-2", "--ttl", "60"], http(201, m))
    check((code, out) == (0, b"m-0000abcd\n"), "fork %r" % ((code, out, err),))
    check(req.startswith(b"POST /v1/machines/sib/branch ") and
          json.loads(req.partition(b"\r\n\r\n")[2]) == {"name": "sib-2", "ttl_seconds": 60}, "fork req %r" % req)

    # list --json prints the array, like the host CLI.
    lst = b'{"machines":[' + m + b',{"id":"m-2","name":null,"status":"running","template":"python"}]}'
    code, out, err, req = run_cli(h, tmp, ["list", "--json"], http(200, lst, chunked=True))
    check(code == 0 and [x["id"] for x in json.loads(out)] == ["m-0000abcd", "m-2"], "list %r" % out)
    code, out, err, req = run_cli(h, tmp, ["ls"], http(200, lst))
    check(out == b"m-0000abcd\tsib\trunning\tpython\nm-2\t-\trunning\tpython\n", "ls %r" % out)

    # Usage errors are documents too, exit 2, nothing sent.
    code, out, err, req = run_cli(h, tmp, ["bogus", "--json"], None)
    check(code == 2 and json.loads(out)["code"] == "USAGE", "usage %r" % ((code, out),))
    code, out, err, req = run_cli(h, tmp, ["new", "--ttl", "soon", "--json"], None)
    check(code == 2 and json.loads(out)["code"] == "USAGE", "bad ttl %r" % ((code, out),))
    check(not h.opened, "a usage error reached the host")

    # A host that refuses the stream: UNAVAILABLE, exit 1.
    p = subprocess.Popen([os.path.join(tmp, "hutch"), "list", "--json"], env=dict(os.environ, HUTCH_API_SOCKET=h.api_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sid = wait_open(h)
    h.sendf(CANCEL, sid)
    out, err = p.communicate(timeout=10)
    check(p.returncode == 1 and json.loads(out)["code"] == "UNAVAILABLE", "refused %r" % ((p.returncode, out),))

    # Closed before the request was read (the agent drops a connection the host refused, and
    # may do so before the CLI has written): a request bigger than the socket's buffer makes
    # the write meet the closed end every time. Still UNAVAILABLE, not death by SIGPIPE.
    lone = os.path.join(tmp, "closing.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(lone)
    srv.listen(1)
    p = subprocess.Popen([os.path.join(tmp, "hutch"), "exec", "--json", "m-1", "--", "echo"] + ["x" * 100000] * 16,
                         env=dict(os.environ, HUTCH_API_SOCKET=lone), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    srv.settimeout(10)
    c, _ = srv.accept()
    time.sleep(0.2)
    c.close()
    srv.close()
    out, err = p.communicate(timeout=10)
    check(p.returncode == 1 and json.loads(out)["code"] == "UNAVAILABLE", "closed early %r" % ((p.returncode, out[:200], err[:200]),))


# ---- forwarded ports (PORT_OPEN) and CONFIGURE's net field ----

class TcpServer:
    """A listener on the test host's loopback (the agent runs here, so its 127.0.0.1 is ours).
    Each connection gets `handler(conn)` in a thread of its own."""

    def __init__(self, handler, family=socket.AF_INET, addr="127.0.0.1", backlog=128):
        import threading
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.handler = handler
        self.closed = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        import threading
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self.run, args=(c,), daemon=True).start()

    def run(self, c):
        try:
            self.handler(c)
        except OSError:
            pass  # closed under it by close()

    def close(self):
        self.closed = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def port_open(h, port, autocredit=True):
    sid = h.new_stream()
    if autocredit:
        h.autocredit.add(sid)
    h.sendf(PORT_OPEN, sid, tlv(1, struct.pack(">H", port)))
    return sid


def wait_port_answer(h, sid, timeout=5):
    """PORT_OPEN (connected) or ERROR: the first frame of the stream."""
    deadline = time.time() + timeout
    while not h.frames[sid]:
        check(time.time() < deadline, "PORT_OPEN not answered")
        h.pump(0.05)
    return h.frames[sid][0]


def port_data(h, sid, until_eof=True, timeout=10):
    """The DATA bytes of a port stream (up to its empty DATA)."""
    deadline = time.time() + timeout
    while True:
        frames = h.frames[sid]
        check(not any(t == ERROR for t, _ in frames), "port stream ended with ERROR %r" % (frames[-1],))
        data = [p for t, p in frames if t == DATA]
        if not until_eof or (data and data[-1] == b""):
            return b"".join(data)
        check(time.time() < deadline, "port stream %d did not end" % sid)
        h.pump(0.05)


def t_port_half_close(h):
    """Bytes both ways; the host's end shuts down the socket's writing side (the server reads
    EOF and still answers); the server's close arrives as an empty DATA."""
    def handler(c):
        got = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += b
        c.sendall(b"got " + got.upper())
        c.close()
    srv = TcpServer(handler)
    try:
        sid = port_open(h, srv.port)
        t, p = wait_port_answer(h, sid)
        check(t == PORT_OPEN and p == b"", "answer 0x%02x %r" % (t, p))
        h.send_data(sid, DATA, b"hello port")  # ends with the empty DATA
        check(port_data(h, sid) == b"got HELLO PORT", "answer %r" % port_data(h, sid, False))
        check(not any(t in TERMINAL for t, _ in h.frames[sid]), "terminal frame on a port stream")
        t_ping(h)
        # The stream is over: a late DATA for it is dropped, not a violation.
        h.sendf(DATA, sid, b"late")
        t_echo(h)
    finally:
        srv.close()


def t_port_server_first(h):
    """The server talks first and closes its side; the host's direction stays open."""
    def handler(c):
        c.sendall(b"220 ready\r\n")
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += b
        c.close()
        results.append(got)
    results = []
    srv = TcpServer(handler)
    try:
        sid = port_open(h, srv.port)
        check(wait_port_answer(h, sid)[0] == PORT_OPEN, "not opened")
        check(port_data(h, sid) == b"220 ready\r\n", "banner")
        h.send_data(sid, DATA, b"QUIT\r\n")
        deadline = time.time() + 5
        while not results:
            check(time.time() < deadline, "server did not see the host's end")
            h.pump(0.05)
        check(results == [b"QUIT\r\n"], "server got %r" % results)
    finally:
        srv.close()


def t_port_refused(h):
    port = free_port()
    sid = port_open(h, port)
    t, p = wait_port_answer(h, sid)
    f = dict(parse_tlv(p))
    check(t == ERROR and f.get(1) == b"ECONNREFUSED", "refused: 0x%02x %r" % (t, f))
    check(str(port).encode() in f.get(2, b""), "message %r" % f.get(2))
    for bad, why in ((tlv(1, b"\0\0"), "port 0"), (b"", "no port"),
                     (tlv(1, b"\0\x50") + tlv(1, b"\0\x50"), "port twice")):
        sid = h.new_stream()
        h.sendf(PORT_OPEN, sid, bad)
        t, p = wait_port_answer(h, sid)
        check(t == ERROR and dict(parse_tlv(p)).get(1) == b"EINVAL", "%s: 0x%02x %r" % (why, t, p))
    t_echo(h)


def t_port_v6(h):
    """Refused on 127.0.0.1, a server on [::1] is tried next."""
    try:
        srv = TcpServer(lambda c: (c.sendall(b"six"), c.close()), socket.AF_INET6, "::1")
    except OSError as e:
        print("     port-v6: skipped (%s)" % e)
        return
    try:
        sid = port_open(h, srv.port)
        check(wait_port_answer(h, sid)[0] == PORT_OPEN, "not opened over ::1")
        check(port_data(h, sid) == b"six", "bytes over ::1")
        h.sendf(DATA, sid, b"")
    finally:
        srv.close()


def t_port_flow(h):
    """3 MB each way through one stream, the host not crediting for a while: windows hold."""
    up = os.urandom(3 * 1000 * 1000)
    down = os.urandom(3 * 1000 * 1000)
    got = {}

    def handler(c):
        import threading
        def reader():
            b = b""
            while True:
                x = c.recv(1 << 16)
                if not x:
                    break
                b += x
            got["up"] = b
        th = threading.Thread(target=reader)
        th.start()
        c.sendall(down)
        c.shutdown(socket.SHUT_WR)
        th.join(30)
        c.close()
    srv = TcpServer(handler)
    try:
        sid = port_open(h, srv.port, autocredit=False)
        check(wait_port_answer(h, sid)[0] == PORT_OPEN, "not opened")
        deadline = time.time() + 10
        while h.received[sid] < WINDOW:
            check(time.time() < deadline, "only %d bytes" % h.received[sid])
            h.pump(0.05)
        h.pump(0.3)
        check(h.received[sid] == WINDOW, "agent sent %d bytes on a %d window" % (h.received[sid], WINDOW))
        h.autocredit.add(sid)
        h.credit(sid, WINDOW - h.recv_win[sid])
        h.send_data(sid, DATA, up)
        check(port_data(h, sid, timeout=30) == down, "download corrupted")
        deadline = time.time() + 10
        while "up" not in got:
            check(time.time() < deadline, "upload did not end")
            h.pump(0.05)
        check(got["up"] == up, "upload corrupted (%d bytes)" % len(got["up"]))
    finally:
        srv.close()


def t_port_cap(h):
    """64 open at once; the 65th is EMFILE and disturbs none; after closing one, opens work."""
    def handler(c):
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)
        c.close()
    srv = TcpServer(handler)
    try:
        sids = [port_open(h, srv.port) for _ in range(64)]
        for sid in sids:
            check(wait_port_answer(h, sid)[0] == PORT_OPEN, "stream %d not opened" % sid)
        over = port_open(h, srv.port)
        t, p = wait_port_answer(h, over)
        check(t == ERROR and dict(parse_tlv(p)).get(1) == b"EMFILE", "65th: 0x%02x %r" % (t, p))
        h.sendf(DATA, sids[10], b"still here")
        deadline = time.time() + 5
        while port_data(h, sids[10], until_eof=False) != b"still here":
            check(time.time() < deadline, "an open stream was disturbed")
            h.pump(0.05)
        h.sendf(CANCEL, sids[0])
        h.sendf(DATA, sids[1], b"")
        check(port_data(h, sids[1]) == b"", "half-closed stream did not end")
        for _ in range(2):
            sid = port_open(h, srv.port)
            check(wait_port_answer(h, sid)[0] == PORT_OPEN, "no room after two streams ended")
            sids.append(sid)
        over = port_open(h, srv.port)
        check(wait_port_answer(h, over)[0] == ERROR, "cap not enforced again")
        for sid in sids[2:]:
            h.sendf(CANCEL, sid)
        t_ping(h)
        # 100 sequential open/close cycles leave nothing behind.
        for _ in range(100):
            sid = port_open(h, srv.port)
            check(wait_port_answer(h, sid)[0] == PORT_OPEN, "cycle: not opened")
            h.sendf(CANCEL, sid)
        t_ping(h)
        sids = [port_open(h, srv.port) for _ in range(64)]
        for sid in sids:
            check(wait_port_answer(h, sid)[0] == PORT_OPEN, "after cycles: not opened")
            h.sendf(CANCEL, sid)
    finally:
        srv.close()


def t_port_cancel(h):
    closed = []

    def handler(c):
        c.settimeout(5)
        try:
            closed.append(c.recv(10))
        except OSError as e:
            closed.append(e)
    srv = TcpServer(handler)
    try:
        sid = port_open(h, srv.port)
        check(wait_port_answer(h, sid)[0] == PORT_OPEN, "not opened")
        h.sendf(CANCEL, sid)
        deadline = time.time() + 5
        while not closed:
            check(time.time() < deadline, "the socket was not closed at CANCEL")
            h.pump(0.05)
        check(closed == [b""], "server saw %r" % closed)
        h.pump(0.2)
        check([t for t, _ in h.frames[sid]] == [PORT_OPEN], "frames after CANCEL %r" % h.frames[sid])
    finally:
        srv.close()


def t_port_slow_socket(h):
    """A server that never reads: the agent keeps serving other streams (no blocking write)."""
    import threading
    stop = threading.Event()

    def handler(c):
        stop.wait(20)
        c.close()
    srv = TcpServer(handler)
    try:
        sid = port_open(h, srv.port)
        check(wait_port_answer(h, sid)[0] == PORT_OPEN, "not opened")
        sent = 0
        deadline = time.time() + 10
        # Fill the socket buffers and our window: the agent stops crediting, never blocks.
        while h.send_win[sid] > 0 and time.time() < deadline:
            n = min(MAXP, h.send_win[sid])
            h.sendf(DATA, sid, b"x" * n)
            h.send_win[sid] -= n
            sent += n
            h.pump(0.01)
        t_echo(h)  # the loop is alive
        h.sendf(CANCEL, sid)
    finally:
        stop.set()
        srv.close()


def net_field(addr="10.0.2.15", prefix=24, gw="10.0.2.2", mtu=1500, dns="10.0.2.3"):
    return (socket.inet_aton(addr) + bytes([prefix]) + socket.inet_aton(gw) + struct.pack(">H", mtu)
            + socket.inet_aton(dns))


def t_configure_net(h):
    """The net field is parsed and checked like the others (--connect mode applies nothing)."""
    for payload in (tlv(7, net_field()), tlv(7, net_field(addr="10.1.2.3", prefix=8, gw="10.0.0.1")),
                    tlv(1, "vm") + tlv(7, net_field(mtu=68))):
        t, p = configure(h, payload)
        check(t == DONE and p == b"", "valid net %r: 0x%02x %r" % (payload, t, p))
    bad = [
        ("14 bytes", tlv(7, net_field()[:14])), ("16 bytes", tlv(7, net_field() + b"\0")),
        ("prefix 0", tlv(7, net_field(prefix=0))), ("prefix 33", tlv(7, net_field(prefix=33))),
        ("mtu 67", tlv(7, net_field(mtu=67))), ("gateway elsewhere", tlv(7, net_field(gw="10.0.3.1"))),
        ("gateway is the address", tlv(7, net_field(gw="10.0.2.15"))),
        ("no dns", tlv(7, net_field(dns="0.0.0.0"))), ("twice", tlv(7, net_field()) + tlv(7, net_field())),
    ]
    for what, payload in bad:
        t, p = configure(h, payload)
        f = dict(parse_tlv(p))
        check(t == ERROR and f.get(1) == b"EINVAL" and f.get(2, b"").startswith(b"configure: "),
              "%s: got 0x%02x %r" % (what, t, f))


def disk_request(h, typ, payload):
    """Sends DISK_MOUNT or DISK_UNMOUNT; returns (type, fields) of its one answer."""
    sid = h.new_stream()
    h.sendf(typ, sid, payload)
    frames = h.wait_end(sid, 15)
    check(len(frames) == 1, "disk request answered with %r" % frames)
    return frames[0][0], dict(parse_tlv(frames[0][1]))


def t_disk_requests(h):
    """--connect mode: DISK_MOUNT and DISK_UNMOUNT are checked exactly as in PID 1 mode (EINVAL),
    then refused with EOPNOTSUPP: on this host, SCSI target T is one of its own disks."""
    u16 = lambda n: struct.pack(">H", n)
    for typ, payload in ((DISK_MOUNT, tlv(1, u16(3)) + tlv(2, "/mnt/data")),
                         (DISK_MOUNT, tlv(2, "/mnt/a b") + tlv(3, b"\x01") + tlv(1, u16(255)) + tlv(9, "later")),
                         (DISK_UNMOUNT, tlv(1, "/mnt/data") + tlv(2, u16(0)))):
        t, f = disk_request(h, typ, payload)
        check(t == ERROR and f.get(1) == b"EOPNOTSUPP", "valid %r: 0x%02x %r" % (payload, t, f))
    bad = [
        (DISK_MOUNT, "no target", tlv(2, "/d")), (DISK_MOUNT, "no path", tlv(1, u16(1))),
        (DISK_MOUNT, "no fields", b""), (DISK_MOUNT, "target 256", tlv(1, u16(256)) + tlv(2, "/d")),
        (DISK_MOUNT, "read_only 2", tlv(1, u16(1)) + tlv(2, "/d") + tlv(3, b"\x02")),
        (DISK_MOUNT, "path twice", tlv(1, u16(1)) + tlv(2, "/d") + tlv(2, "/e")),
        (DISK_MOUNT, "relative path", tlv(1, u16(1)) + tlv(2, "mnt/d")),
        (DISK_MOUNT, "/", tlv(1, u16(1)) + tlv(2, "/")),
        (DISK_MOUNT, "/..", tlv(1, u16(1)) + tlv(2, "/mnt/..")),
        (DISK_MOUNT, "/../", tlv(1, u16(1)) + tlv(2, "/mnt/../etc")),
        (DISK_MOUNT, "trailing /", tlv(1, u16(1)) + tlv(2, "/mnt/")),
        (DISK_MOUNT, "NUL", tlv(1, u16(1)) + tlv(2, b"/mnt\0x")),
        (DISK_MOUNT, "256-byte path", tlv(1, u16(1)) + tlv(2, "/" + "a" * 255)),
        (DISK_UNMOUNT, "no target", tlv(1, "/d")), (DISK_UNMOUNT, "no path", tlv(2, u16(1))),
        (DISK_UNMOUNT, "mount's tags", tlv(1, u16(1)) + tlv(2, "/d")),
        (DISK_UNMOUNT, "target twice", tlv(1, "/d") + tlv(2, u16(1)) + tlv(2, u16(1))),
    ]
    for typ, what, payload in bad:
        t, f = disk_request(h, typ, payload)
        prefix = b"disk mount: " if typ == DISK_MOUNT else b"disk unmount: "
        check(t == ERROR and f.get(1) == b"EINVAL" and f.get(2, b"").startswith(prefix),
              "%s: got 0x%02x %r" % (what, t, f))
    t_echo(h)


def t_write_blocked(h):
    """The host grants huge windows but stops reading: the agent's queue toward the host
    must stay bounded (it stops reading the pipes), and everything arrives once the host
    reads again."""
    size = 20 * 1000 * 1000
    sids = [h.exec(["head", "-c", str(size), "/dev/zero"], autocredit=False) for _ in range(8)]
    for sid in sids:
        h.credit(sid, size)
    time.sleep(1.5)
    rss = 0
    with open("/proc/%d/status" % h.proc.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    print("    agent RSS while blocked: %d kB" % rss)
    check(rss < 6 * 1024, "agent RSS %d kB while the host is not reading" % rss)
    for sid in sids:
        out, _, t, f = collect(h.wait_end(sid, 60))
        check(len(out) == size and t == EXIT, "stream got %d bytes" % len(out))


def t_poweroff(h):
    h.sendf(POWEROFF, 0)
    try:
        h.proc.wait(5)
    except subprocess.TimeoutExpired:
        raise Fail("agent did not exit on POWEROFF")
    check(h.proc.returncode == 0, "exit status %d" % h.proc.returncode)


def run_boot_test(binary):
    """The boot parameters' unit tests, with a real 64 MiB ext4 image when mkfs.ext4 exists."""
    args = [binary]
    tmp = tempfile.mkdtemp(prefix="hutch-boot-test-")
    try:
        mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
        if mkfs:
            img = os.path.join(tmp, "fs.ext4")
            subprocess.run([mkfs, "-q", "-F", "-b", "4096", img, "64M"], check=True, capture_output=True)
            args += [img, str(64 * 256)]
        else:
            print("     boot-image: skipped (no mkfs.ext4)")
        r = subprocess.run(args, capture_output=True, text=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.write(r.stdout + r.stderr)
    m = re.search(r"boot: (\d+) passed, (\d+) failed", r.stdout)
    if not m:
        return 0, 1
    return int(m.group(1)), int(m.group(2)) + (1 if r.returncode != 0 and not int(m.group(2)) else 0)


h_api_path = [None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors-test", required=True)
    ap.add_argument("--vectors", required=True)
    ap.add_argument("--boot-test")
    ap.add_argument("--agent", required=True)
    ap.add_argument("-k", help="only tests whose name contains this")
    a = ap.parse_args()
    passed = failed = 0

    if not a.k:
        r = subprocess.run([a.vectors_test, a.vectors], capture_output=True, text=True)
        sys.stdout.write(r.stdout + r.stderr)
        m = re.search(r"vectors: (\d+) passed, (\d+) failed", r.stdout)
        if m:
            passed += int(m.group(1))
            failed += int(m.group(2))
        if r.returncode != 0 and not (m and int(m.group(2))):
            failed += 1
        if a.boot_test:
            p, f = run_boot_test(a.boot_test)
            passed, failed = passed + p, failed + f

    work = tempfile.mkdtemp(prefix="hutch-agent-test-")
    h = Host(os.path.abspath(a.agent), work)
    h_api_path[0] = h.api_path
    try:
        passed, failed = run_tests(a, h, passed, failed)
    finally:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()
        h.log.close()
    if not a.k:
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "pid1-smoke.py"), a.agent],
                           capture_output=True, text=True, timeout=300)
        lines = r.stdout.splitlines()
        sys.stdout.write("\n".join(lines[:-1]) + "\n" + r.stderr)
        m = re.match(r"(\d+) passed, (\d+) failed", lines[-1] if lines else "")
        if m:
            passed += int(m.group(1))
            failed += int(m.group(2))
        if r.returncode != 0 and not (m and int(m.group(2))):
            failed += 1
    if failed:
        with open(os.path.join(work, "agent.log"), "rb") as f:
            print("---- agent log (last 40 lines) ----")
            print(b"\n".join(f.read().splitlines()[-40:]).decode(errors="replace"))
    shutil.rmtree(work, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)


def run_tests(a, h, passed, failed):
    tests = [
        ("ping", t_ping), ("echo", t_echo), ("stderr", t_stderr), ("exit-code", t_exit_code),
        ("env-cwd", t_env_cwd), ("stdin-cat", t_stdin_cat), ("stdin-devnull", t_stdin_devnull),
        ("flow-control-10mb", t_flow_control), ("timeout", t_timeout), ("enoent", t_enoent),
        ("einval", t_einval), ("signal", t_signal), ("cancel", t_cancel),
        ("background-holder", t_background_holder), ("pty-resize", t_pty),
        ("concurrent", t_concurrent), ("files-5mb", t_files), ("file-errors", t_file_errors),
        ("file-cancel", t_file_cancel), ("configure", t_configure), ("write-blocked", t_write_blocked),
        ("disconnect", t_disconnect), ("hello", t_hello), ("api-without-feature", t_api_without_feature),
        ("api-roundtrip", t_api_roundtrip), ("api-flow-5mb", t_api_flow_5mb), ("api-cancel", t_api_cancel),
        ("api-limit", t_api_limit), ("guest-cli", t_guest_cli),
        ("port-half-close", t_port_half_close), ("port-server-first", t_port_server_first),
        ("port-refused", t_port_refused), ("port-v6", t_port_v6), ("port-flow", t_port_flow),
        ("port-cap", t_port_cap), ("port-cancel", t_port_cancel), ("port-slow-socket", t_port_slow_socket),
        ("configure-net", t_configure_net), ("disk-requests", t_disk_requests), ("unsupported", t_unsupported), ("violation-resync", t_violation), ("poweroff", t_poweroff),
    ]
    for name, fn in tests:
        if a.k and a.k not in name:
            continue
        tmp = tempfile.mkdtemp(dir=os.path.dirname(h.path))
        start = time.time()
        try:
            if h.conn is None:
                h.accept()
            if fn.__code__.co_argcount == 2:
                fn(h, tmp)
            else:
                fn(h)
            passed += 1
            print("ok   %-20s %.2fs" % (name, time.time() - start))
        except Exception as e:  # noqa: BLE001 - any failure is reported the same way
            failed += 1
            print("FAIL %-20s %s" % (name, e))
            if not isinstance(e, Fail):
                traceback.print_exc()
            try:
                if h.proc.poll() is not None:
                    print("agent died with status %s; restarting" % h.proc.returncode)
                    h.close()
                    h.proc = subprocess.Popen(h.argv(os.path.abspath(a.agent)), stdout=h.log, stderr=h.log)
                else:
                    h.close()  # start the next test on a fresh connection
                h.accept()
            except Exception as e2:  # noqa: BLE001
                print("cannot reconnect to the agent (%s); giving up" % e2)
                failed += 1
                break
    return passed, failed


if __name__ == "__main__":
    main()
