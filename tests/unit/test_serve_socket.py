"""The listening socket of `flowledger serve` is one asyncio knows for TCP, so the
connections it accepts get TCP_NODELAY: without it, each answer on a kept-alive connection
(a browser's polling, any HTTP client's) waited 40 ms for the client's delayed ACK."""

from __future__ import annotations

import asyncio
import socket

from flowledger.adapters.cli_serve import _listen


def test_the_listening_socket_names_tcp() -> None:
    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_connections_it_accepts_do_not_wait_to_coalesce_small_writes() -> None:
    async def accepted_nodelay() -> int:
        sock = _listen("127.0.0.1", 0)
        sock.listen()
        flag: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = writer.get_extra_info("socket")
            flag.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accept, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            nodelay = await asyncio.wait_for(flag, 10)
            writer.close()
        return nodelay

    assert asyncio.run(accepted_nodelay()) != 0
