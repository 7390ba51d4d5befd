"""The server a Python user would pick instead: python-socketio 5 under uvicorn.

Run by the bench with the interpreter of its own virtual environment (``_peers``), not
imported by trio_chat. Each guest joins a room of its own on connect, as a trio-chat
guest is subscribed to its conversation; a ``message`` event is emitted to that room
(the sender included) and acknowledged. Nothing is stored.

    python socketio_peer.py PORT
"""

import sys

import socketio
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)
app = socketio.ASGIApp(sio)
sequence = 0


async def connect(sid: str, environ: object) -> None:
    await sio.enter_room(sid, "guest-" + sid)


async def message(sid: str, data: dict[str, object]) -> dict[str, object]:
    global sequence
    sequence += 1
    await sio.emit("message", data, room="guest-" + sid)
    return {"client_msg_id": data.get("client_msg_id"), "seq": sequence}


sio.on("connect", connect)
sio.on("message", message)

if __name__ == "__main__":
    port = int(sys.argv[1])
    # The bench waits until the port accepts connections.
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", log_level="warning", backlog=4096)
