"""Dependencies of the realtime domain."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from helpline.realtime.engine import GenerationEngine


def get_engine(connection: HTTPConnection) -> GenerationEngine:
    engine: GenerationEngine = connection.app.state.generation_engine
    return engine


Engine = Annotated[GenerationEngine, Depends(get_engine)]
