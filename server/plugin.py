"""vLLM endpoint plugin (`vllm.endpoint_plugins`): steerserve's routes on vLLM's own app."""

from __future__ import annotations

import asyncio
import signal
from argparse import Namespace
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from vllm.v1.engine.exceptions import EngineDeadError

from server import lifecycle, limits
from server.auth import BearerAuth
from server.calibrate import router as calibrate_router
from server.contrast import router as contrast_router
from server.discovery import router as discovery_router
from server.errors import APIError, api_error_handler
from server.playground import router as playground_router
from server.routes import router
from server.settings import APISettings
from server.state import SteeringState
from steering.wire import EngineSettings


class SteeringEndpoints:
    name = "steerserve_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)  # replaces vLLM's completion routes and GET /v1/models
        app.include_router(discovery_router)
        app.include_router(contrast_router)
        app.include_router(calibrate_router)
        app.include_router(playground_router)
        app.include_router(lifecycle.router)  # replaces GET /health
        app.add_exception_handler(APIError, api_error_handler)
        app.add_exception_handler(EngineDeadError, lifecycle.engine_dead)
        app.add_exception_handler(HTTPException, limits.http_error)
        app.add_middleware(BearerAuth)
        app.add_middleware(limits.BodyLimit, max_bytes=limits.max_body_bytes())  # outermost: before auth reads anything

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        settings = EngineSettings.from_additional_config(args.additional_config)
        if settings is None:
            raise RuntimeError("steerserve_api needs the steering settings in --additional-config")
        served = set(args.served_model_name or [args.model])
        # vLLM runs one of these per API process (`--api-server-count`; as many as data-parallel
        # ranks by default), each with its own state; presets and policy load in each, from files.
        processes = args.api_server_count or 1
        state.steering = steering = SteeringState(settings, APISettings.from_env(), served, Path(args.model), processes)
        steering.presets.watch()
        steering.readouts.start()
        state.lifecycle = lifecycle.Lifecycle(engine_client)
        state.lifecycle.start(state)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, steering.presets.reload)
