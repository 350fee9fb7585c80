import socket, sys, time, base64, os
addr = sys.argv[1]; pid = int(sys.argv[2]); n = int(sys.argv[3]); kind = sys.argv[4]
host, port = addr.split(':'); port = int(port)
def rss():
    for l in open(f'/proc/{pid}/status'):
        if l.startswith('VmRSS:'): return int(l.split()[1])
before = rss()
socks = []
for i in range(n):
    s = socket.create_connection((host, port))
    if kind == 'http':
        s.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
        data = b''
        while b'\r\n\r\n' not in data: data += s.recv(4096)
    else:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f'GET /ws?device_id=idle{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n'.encode())
        data = b''
        while b'\r\n\r\n' not in data: data += s.recv(4096)
        assert b' 101 ' in data, data
    socks.append(s)
time.sleep(1.0)
after = rss()
print(f'{kind}: {n} idle connections: RSS {before} KiB -> {after} KiB: {(after-before)*1024/n:.0f} bytes per connection')
