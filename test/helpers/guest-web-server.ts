/**
 * A small web server to run inside a guest (python3 stdlib only), bound to the guest's loopback
 * so only a preview (through the agent) can reach it: a page, a streamed response, a redirect
 * with a cookie, and a WebSocket echo (handshake and frames by hand: no packages in the guest).
 */
export const guestWebServer = `
import base64, hashlib, http.server, socketserver, struct, sys, time

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send_text(self, code, text, extra=()):
        body = text.encode()
        self.send_response(code)
        for k, v in extra: self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/":
            return self.send_text(200, "hello from the guest")
        if self.path == "/headers":
            return self.send_text(200, "prefix=%s auth=%s" % (self.headers.get("X-Forwarded-Prefix"), self.headers.get("Authorization")))
        if self.path == "/redirect":
            return self.send_text(302, "", [("Location", "/target"), ("Set-Cookie", "a=1; Path=/")])
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                chunk = ("tick %d\\n" % i).encode()
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(chunk), chunk)); self.wfile.flush()
                time.sleep(0.4)
            self.wfile.write(b"0\\r\\n\\r\\n")
            return
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket"); self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers(); self.wfile.flush()
            r = self.rfile
            while True:
                h = r.read(2)
                if len(h) < 2: return
                op, n = h[0] & 15, h[1] & 127
                if n == 126: n = struct.unpack(">H", r.read(2))[0]
                elif n == 127: n = struct.unpack(">Q", r.read(8))[0]
                mask = r.read(4) if h[1] & 128 else b"\\0\\0\\0\\0"
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
                if op == 8: return
                out = b"echo:" + data
                self.wfile.write(bytes([0x81, len(out)]) + out if len(out) < 126 else bytes([0x81, 126]) + struct.pack(">H", len(out)) + out)
                self.wfile.flush()
        return self.send_text(404, "no")
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.send_text(200, "got %d bytes" % len(self.rfile.read(n)))

class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
`;

/** The shell command that writes the server into the guest and starts it in the background. */
export function startGuestWebServer(port: number): string {
  return `cat > /tmp/web.py <<'PYEOF'\n${guestWebServer}\nPYEOF\nsetsid nohup python3 /tmp/web.py ${port} >/tmp/web.log 2>&1 < /dev/null &\nfor i in $(seq 100); do grep -q ":$(printf '%04X' ${port}) 00000000:0000 0A" /proc/net/tcp && exit 0; sleep 0.1; done; cat /tmp/web.log; exit 1`;
}
