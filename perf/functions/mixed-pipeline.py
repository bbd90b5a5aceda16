#!/usr/bin/env python3
"""Clients that pipeline each invocation behind a request the server answers
itself, against a running hearth: the pattern that leaves a connection with an
answer still to write when its invocation is read (for a function limited to
fewer instances than cores, that connection must take the answer along to
move, or the instance is handed over for it).

Usage: mixed-pipeline.py ADDR FUNCTION_ID ADMIN_TOKEN [SECONDS=3] [CLIENTS=12]

Each client sends `GET /healthz` + `GET /f/<id>/whoami`, three pairs at a time,
and reads the six answers; at the end prints the answers read, the errors, and
the function's connection moves and hand-overs from /metrics (so far).
"""
import socket
import sys
import threading
import time
import urllib.request

addr, fid, token = sys.argv[1], sys.argv[2], sys.argv[3]
seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
clients = int(sys.argv[5]) if len(sys.argv) > 5 else 12
host, port = addr.rsplit(':', 1)
pair = (f'GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n'
        f'GET /f/{fid}/whoami HTTP/1.1\r\nHost: t\r\n\r\n').encode()
answers = [0] * clients
errors = []


def client(k):
    s = socket.create_connection((host, int(port)))
    buf = b''
    end = time.time() + seconds
    while time.time() < end:
        s.sendall(pair * 3)
        for _ in range(6):
            while b'\r\n\r\n' not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    errors.append('connection closed')
                    return
                buf += chunk
            head, rest = buf.split(b'\r\n\r\n', 1)
            length = next(int(line.split(b':', 1)[1]) for line in head.split(b'\r\n')
                          if line.lower().startswith(b'content-length:'))
            while len(rest) < length:
                rest += s.recv(65536)
            if not head.startswith(b'HTTP/1.1 200'):
                errors.append(head.split(b'\r\n', 1)[0].decode())
            buf = rest[length:]
            answers[k] += 1


threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
req = urllib.request.Request(f'http://{addr}/metrics', headers={'authorization': f'Bearer {token}'})
metrics = urllib.request.urlopen(req).read().decode()


def metric(name):
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith(name + '{') and f'function="{fid}"' in line)


print(f'answers {sum(answers)} errors {len(errors)} {errors[:3]} '
      f'moves {metric("hearth_function_connections_moved_total"):.0f} '
      f'handovers {metric("hearth_function_instance_handovers_total"):.0f}')
