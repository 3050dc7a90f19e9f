"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from mimoserve.api.auth import require_principal
from mimoserve.chat.service import ChatService
from mimoserve.protocol.chat import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(require_principal)])


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    service: ChatService = request.app.state.chat
    return service.catalogue.list_models()


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    service: ChatService = request.app.state.chat
    return service.catalogue.get_model(model_id)
