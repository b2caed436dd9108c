"""The baseline: a bare Starlette WebSocket server streaming the same fake token generator.

No database, no engine, no fan-out: per socket, a request frame `{"tokens": N, "delay_ms": D}`
is answered with one `token` frame per piece and a final `complete` frame, as a minimal
per-connection streaming server would. Run: `python bench/bare_server.py PORT`.
"""

from __future__ import annotations

import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from helpline.agents.providers.fake import FakeChatModel
from helpline.agents.schemas import ChatMessage, TextDelta

model = FakeChatModel()


async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            request = json.loads(await websocket.receive_text())
            directive = f"[[tokens={request['tokens']} delay_ms={request.get('delay_ms', 0)}]]"
            seq = 0
            async for event in model.stream([ChatMessage(role="user", content=directive)]):
                if isinstance(event, TextDelta):
                    seq += 1
                    await websocket.send_text(
                        json.dumps({"type": "token", "seq": seq, "content": event.text})
                    )
            await websocket.send_text(json.dumps({"type": "complete", "seq": seq + 1}))
    except WebSocketDisconnect:
        return


app = Starlette(routes=[WebSocketRoute("/ws", stream)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), ws="wsproto", log_level="warning")
