#!/usr/bin/env python3
"""A cellular modem's AT socket interface, for a unit's firmware under QEMU.

The firmware's UART reaches this program (QEMU connects its serial port here,
`-chardev socket,...`); it answers as the common modules do in their
non-transparent socket mode and opens real TCP connections for the unit:

    ATE0                            -> OK
    AT                              -> OK
    AT+CIPSTART="TCP","host",port   -> OK, then CONNECT OK | CONNECT FAIL
                                       (ALREADY CONNECT when one is open)
    AT+CIPSEND=n                    -> "> ", n bytes, SEND OK | SEND FAIL
    AT+CIPCLOSE                     -> CLOSE OK | ERROR
    (from the peer)                 -> +IPD,n:<n bytes>
    (peer closed)                   -> CLOSED

One unit at a time; a unit that reconnects (a board reset) finds its socket
still open, as a modem keeps it across the microcontroller's reset.

usage: at-modem.py --listen PORT [--log FILE]
"""

import argparse
import asyncio
import re
import sys

START = re.compile(rb'^AT\+CIPSTART="TCP","([^"]+)",(\d+)$')
SEND = re.compile(rb"^AT\+CIPSEND=(\d+)$")
MAX_SEND = 1460


class Modem:
    def __init__(self, log):
        self.log = log
        self.unit_writer = None
        self.sock_reader = None
        self.sock_writer = None
        self.relay = None
        self.stats = {"commands": 0, "bytes_up": 0, "bytes_down": 0, "connects": 0, "closed_by_peer": 0}

    def say(self, *parts):
        if self.unit_writer is not None:
            self.unit_writer.write(b"".join(parts))

    def note(self, msg):
        if self.log:
            self.log.write(msg + "\n")
            self.log.flush()

    async def close_socket(self):
        if self.relay is not None:
            self.relay.cancel()
            self.relay = None
        if self.sock_writer is not None:
            self.sock_writer.close()
            self.sock_writer = None
            self.sock_reader = None
            return True
        return False

    async def relay_down(self, reader):
        try:
            while True:
                data = await reader.read(1024)
                if not data:
                    break
                self.stats["bytes_down"] += len(data)
                self.say(b"\r\n+IPD,%d:" % len(data), data)
                if self.unit_writer is not None:
                    await self.unit_writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        self.stats["closed_by_peer"] += 1
        self.note("peer closed")
        self.sock_writer = None
        self.sock_reader = None
        self.relay = None
        self.say(b"\r\nCLOSED\r\n")

    async def command(self, line, reader):
        self.stats["commands"] += 1
        self.note("< " + line.decode(errors="replace"))
        if line in (b"AT", b"ATE0"):
            self.say(b"\r\nOK\r\n")
        elif m := START.match(line):
            if self.sock_writer is not None:
                self.say(b"\r\nALREADY CONNECT\r\n")
                return
            self.say(b"\r\nOK\r\n")
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(m.group(1).decode(), int(m.group(2))), 5)
            except (OSError, asyncio.TimeoutError):
                self.say(b"\r\nCONNECT FAIL\r\n")
                return
            self.sock_reader, self.sock_writer = r, w
            self.stats["connects"] += 1
            self.relay = asyncio.create_task(self.relay_down(r))
            self.say(b"\r\nCONNECT OK\r\n")
        elif m := SEND.match(line):
            n = int(m.group(1))
            if self.sock_writer is None or not 0 < n <= MAX_SEND:
                self.say(b"\r\nERROR\r\n")
                return
            self.say(b"> ")
            data = await reader.readexactly(n)
            try:
                self.sock_writer.write(data)
                await self.sock_writer.drain()
                self.stats["bytes_up"] += n
                self.say(b"\r\nSEND OK\r\n")
            except (ConnectionError, AttributeError):
                self.say(b"\r\nSEND FAIL\r\n")
        elif line == b"AT+CIPCLOSE":
            self.say(b"\r\nCLOSE OK\r\n" if await self.close_socket() else b"\r\nERROR\r\n")
        else:
            self.say(b"\r\nERROR\r\n")

    async def serve_unit(self, reader, writer):
        self.unit_writer = writer
        self.note("unit attached")
        line = b""
        try:
            while True:
                b = await reader.read(1)
                if not b:
                    break
                if b in (b"\r", b"\n"):
                    if line:
                        await self.command(line, reader)
                        await writer.drain()
                    line = b""
                elif len(line) < 256:
                    line += b
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        self.note("unit detached")
        self.unit_writer = None


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--log")
    args = ap.parse_args()
    log = open(args.log, "a") if args.log else None
    modem = Modem(log)
    server = await asyncio.start_server(modem.serve_unit, "127.0.0.1", args.listen)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
