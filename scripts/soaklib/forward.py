"""A TCP forwarder the soak controls, run as its own process (also inside the network
namespace): `python3 forward.py --map LHOST:LPORT=THOST:TPORT ...`. It prints `ready` once
every listener is open, then reads commands on stdin, one a line:

  latency MS      delay every chunk by MS milliseconds (each direction)
  bandwidth BPS   at most BPS bytes a second per direction and connection
  normal          no latency, no bandwidth limit
  reset           abort every open connection with a TCP RST
  hold / release  stop relaying (connections stay open) / relay again
  close / open    stop listening (connections are refused, as by a broker that is down; open
                  ones stay) / listen again
"""

import argparse
import asyncio
import socket
import struct
import sys


class State:
    def __init__(self):
        self.latency = 0.0
        self.bandwidth = None
        self.maps = []
        self.servers = []
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connections = set()


def rst(writer):
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


async def pump(state, reader, writer):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def read():
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((loop.time() + state.latency, data))
                if not data:
                    return
        except (OSError, asyncio.IncompleteReadError):
            queue.put_nowait((0, b""))

    reading = asyncio.ensure_future(read())
    try:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await state.flowing.wait()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            if state.bandwidth:
                await asyncio.sleep(len(data) / state.bandwidth)
        writer.write_eof()
    except OSError:
        pass
    finally:
        reading.cancel()


async def connect(target, reader):
    """The upstream connection, tried again while the client stays (up to 30 s): a target
    that cannot be reached (a partitioned veth, a broker restarting) leaves the client's
    connection silent, as an unanswered SYN would, instead of resetting it (a reset in a TLS
    handshake reads as a TLS failure, not as a network one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        try:
            return await asyncio.wait_for(asyncio.open_connection(*target), 5)
        except (OSError, asyncio.TimeoutError):
            if loop.time() > deadline or reader.at_eof():
                return None
            await asyncio.sleep(0.5)


async def handle(state, target, reader, writer):
    upstream = await connect(target, reader)
    if upstream is None:
        writer.transport.abort()
        return
    up_reader, up_writer = upstream
    pair = (writer, up_writer)
    state.connections.add(pair)
    try:
        await asyncio.gather(pump(state, reader, up_writer), pump(state, up_reader, writer))
    finally:
        state.connections.discard(pair)
        for w in pair:
            w.transport.abort()


async def listen(state):
    for (lhost, lport), target in state.maps:
        state.servers.append(await asyncio.start_server(
            lambda r, w, t=target: handle(state, t, r, w), lhost, lport, reuse_address=True))


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


async def control(state):
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd, *arg = line.decode().split()
        if cmd == "latency":
            state.latency = float(arg[0]) / 1000
        elif cmd == "bandwidth":
            state.bandwidth = float(arg[0])
        elif cmd == "normal":
            state.latency, state.bandwidth = 0.0, None
        elif cmd == "reset":
            for pair in list(state.connections):
                for w in pair:
                    rst(w)
        elif cmd == "hold":
            state.flowing.clear()
        elif cmd == "release":
            state.flowing.set()
        elif cmd == "close":
            for server in state.servers:
                server.close()
            state.servers = []
        elif cmd == "open" and not state.servers:
            await listen(state)
        print("ok " + cmd, flush=True)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--map", action="append", required=True, help="LHOST:LPORT=THOST:TPORT")
    args = parser.parse_args()
    state = State()
    for mapping in args.map:
        listen_at, target = mapping.split("=")
        state.maps.append((split(listen_at), split(target)))
    await listen(state)
    print("ready", flush=True)
    # The soak ends us by closing stdin (or by a signal).
    await control(state)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
