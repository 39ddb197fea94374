"""Socket clients for the security tests, run as another account (through setpriv), since
the agent knows a peer by the uid that opened the connection.

  peer.py streams SOCKET N PATH...   open N follow streams one after another (PATHs in
                                     turn); print {"held", "refused": {code: n}, "messages"};
                                     hold what was granted until stdin closes
  peer.py slow SOCKET N              keep N connections open that trickle header bytes
                                     (reconnecting when cut); print {"opened"} once they are
                                     open, then {"answered", "cut"} for every line read from
                                     stdin and when stdin closes
  peer.py caps SOCKET N PATH         open N+1 connections, then ask PATH on each; print
                                     {"answers": {code: n}, "messages"}; once all are closed
                                     ask again until not 1000429, print {"after"}
  peer.py split SOCKET PATH LEN      send the headers of a POST with a LEN-byte body, wait for
                                     the answer, then send the body; print {"send_error",
                                     "status", "envelope"}
  peer.py httpclient SOCKET PATH LEN POST a LEN-byte body with http.client; print {"status",
                                     "envelope"} or {"error"}
"""

import http.client
import json
import select
import socket
import sys
import time


def connect(path, timeout=10.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_answer(s, deadline, whole=True):
    """(status, headers, body) of one answer; body read to Content-Length when whole."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        s.settimeout(max(0.01, deadline - time.time()))
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ") if lines and lines[0] else []
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if whole and "content-length" in headers:
        want = int(headers["content-length"])
        while len(rest) < want:
            s.settimeout(max(0.01, deadline - time.time()))
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, headers, rest


def envelope(body):
    try:
        return json.loads(body)
    except ValueError:
        return {"unparsed": body[:300].decode("utf-8", "replace")}


def out(v):
    print(json.dumps(v), flush=True)


def wait_stdin():
    sys.stdin.read()


def streams(sock, n, paths):
    held, refused, messages = [], {}, {}
    for i in range(n):
        p = paths[i % len(paths)]
        try:
            s = connect(sock)
            s.sendall(("GET %s HTTP/1.1\r\nHost: agent\r\n\r\n" % p).encode())
            status, headers, body = read_answer(s, time.time() + 10, whole=False)
        except OSError as e:
            # Not answered (the agent is out of connections): the rest would wait as well.
            refused[repr(e)] = n - i
            break
        if status == 200 and headers.get("content-type", "").startswith("application/x-ndjson"):
            held.append(s)
            continue
        if "content-length" in headers:
            want = int(headers["content-length"])
            while len(body) < want:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
        env = envelope(body)
        code = str(env.get("code", "status %d" % status))
        refused[code] = refused.get(code, 0) + 1
        messages[code] = env.get("message", env.get("unparsed", ""))
        s.close()
    out({"held": len(held), "refused": refused, "messages": messages})
    wait_stdin()


def slow(sock, n):
    socks = []

    def opened():
        try:
            s = connect(sock, timeout=5.0)
            s.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: agent\r\n")
            s.setblocking(False)
            return s
        except OSError:
            return None

    deadline = time.time() + 60
    while len(socks) < n and time.time() < deadline:
        s = opened()
        if s is not None:
            socks.append(s)
    out({"opened": len(socks)})
    answered, cut = {}, 0
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.2)
        if r:
            if not sys.stdin.readline():
                break
            out({"answered": answered, "cut": cut})
        for i, s in enumerate(socks):
            gone = False
            try:
                data = s.recv(65536)
                if data:
                    _, _, body = data.partition(b"\r\n\r\n")
                    code = str(envelope(body).get("code", "?"))
                    answered[code] = answered.get(code, 0) + 1
                gone = True
            except BlockingIOError:
                try:
                    s.send(b"X")
                except BlockingIOError:
                    pass
                except OSError:
                    gone = True
            except OSError:
                gone = True
            if gone:
                cut += 1
                s.close()
                socks[i] = opened() or s
    out({"answered": answered, "cut": cut})


def ask(s, path):
    s.sendall(("GET %s HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n" % path).encode())
    status, _, body = read_answer(s, time.time() + 30)
    env = envelope(body)
    return {"status": status, "code": env.get("code"), "message": env.get("message")}


def caps(sock, n, path):
    conns = [connect(sock) for _ in range(n + 1)]
    for c in conns:
        c.sendall(("GET %s HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n" % path).encode())
    codes, messages = {}, {}
    for c in conns:
        try:
            status, _, body = read_answer(c, time.time() + 30)
            env = envelope(body)
            code = str(env.get("code", "status %d" % status))
            messages[code] = env.get("message", env.get("unparsed", ""))
        except OSError as e:
            code = repr(e)
        codes[code] = codes.get(code, 0) + 1
    # Closed only once every answer is in: until then each holds its slot.
    for c in conns:
        c.close()
    out({"answers": codes, "messages": messages})
    # Every connection is closed: the uid's slots come back.
    deadline = time.time() + 20
    while True:
        a = ask(connect(sock), path)
        if a["code"] != 1000429 or time.time() > deadline:
            break
        time.sleep(0.05)
    out({"after": a})


def split(sock, path, length):
    s = connect(sock, timeout=30.0)
    s.sendall(
        (
            "POST %s HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (path, length)
        ).encode()
    )
    # The agent answers before reading the body: wait until its answer is there, and a little.
    select.select([s], [], [], 30)
    time.sleep(0.3)
    send_error = None
    try:
        s.sendall(b" " * length)
    except OSError as e:
        send_error = repr(e)
    try:
        status, _, body = read_answer(s, time.time() + 30)
        out({"send_error": send_error, "status": status, "envelope": envelope(body)})
    except OSError as e:
        out({"send_error": send_error, "read_error": repr(e)})


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("agent", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = connect(self.unix_path, timeout=30.0)


def httpclient(sock, path, length):
    conn = UnixHTTPConnection(sock)
    try:
        conn.request("POST", path, body=b" " * length, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out({"status": resp.status, "envelope": envelope(resp.read())})
    except Exception as e:  # noqa: BLE001 - the test prints whatever the client hit
        out({"error": repr(e)})


def main():
    mode, sock = sys.argv[1], sys.argv[2]
    if mode == "streams":
        streams(sock, int(sys.argv[3]), sys.argv[4:])
    elif mode == "slow":
        slow(sock, int(sys.argv[3]))
    elif mode == "caps":
        caps(sock, int(sys.argv[3]), sys.argv[4])
    elif mode == "split":
        split(sock, sys.argv[3], int(sys.argv[4]))
    elif mode == "httpclient":
        httpclient(sock, sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("unknown mode " + mode)


main()
