"""vLLM endpoint plugin (`vllm.endpoint_plugins`): steerserve's routes on vLLM's own app."""

from __future__ import annotations

import asyncio
import signal
from argparse import Namespace

from fastapi import FastAPI
from starlette.datastructures import State

from server.auth import BearerAuth
from server.routes import router
from server.settings import APISettings, SteeringSettings
from server.state import SteeringState


class SteeringEndpoints:
    name = "steerserve_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)  # replaces vLLM's completion routes and GET /v1/models
        app.add_middleware(BearerAuth)

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        settings = SteeringSettings.from_additional_config(args.additional_config)
        if settings is None:
            raise RuntimeError("steerserve_api needs the steering settings in --additional-config")
        served = set(args.served_model_name or [args.model])
        state.steering = steering = SteeringState(settings, APISettings.from_env(), served)
        steering.presets.watch()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, steering.presets.reload)
