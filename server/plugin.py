"""vLLM endpoint plugin (`vllm.endpoint_plugins`): steerserve's routes on vLLM's own app."""

from __future__ import annotations

from argparse import Namespace

from fastapi import FastAPI
from starlette.datastructures import State

from server.routes import router
from server.settings import SteeringSettings
from server.state import SteeringState


class SteeringEndpoints:
    name = "steerserve_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)  # replaces vLLM's POST /v1/chat/completions and /v1/completions

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        settings = SteeringSettings.from_additional_config(args.additional_config)
        if settings is None:
            raise RuntimeError("steerserve_api needs the steering settings in --additional-config")
        state.steering = SteeringState.load(settings)
