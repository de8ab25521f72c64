"""The local HTTP API over a Recommender: JSON endpoints for a partner's own backend, on loopback.

    POST /recommend   top-k for a user (or for a new user's few items), filters, re-ranking, explanations
    POST /explain     the history items that contributed most to one item's score
    POST /bundle      items that go with a basket
    POST /events      record one event (logged for the next round; the user's embedding updates now)
    POST /items       add new items to the served catalogue (embedded from their content features)
    POST /reload      take in the state dir's newest item-tower snapshot and user rows now
    GET  /health      liveness and the snapshot served (no authentication, nothing about users)
    GET  /openapi.json

Every endpoint but /health and /openapi.json needs `Authorization: Bearer <token>`.
Bad input is a 4xx with a `detail` that names the field: pydantic rejects
malformed bodies (422), the Recommender's UnknownUserError / UnknownItemError
are 404 and its other ValueErrors 422; a state that cannot be read is 503.
Endpoints are `async` on purpose: the Recommender then runs on the event loop's
one thread, so requests never interleave inside it (record() mutates it).
Reloads and new items are built in a worker thread and swapped in on the loop
thread, between requests: a request in flight finishes on the table it started
with. A background task checks the state dir once a second (`watch_interval`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedtower import __version__
from fedtower.client.state import StateError
from fedtower.data.ids import MAX_ID_LENGTH
from fedtower.data.schema import BEHAVIOURS
from fedtower.serving.types import Filters, ItemExistsError, UnknownItemError, UnknownUserError

log = logging.getLogger("fedtower.serving.http")

MAX_K = 1000
MAX_BODY_BYTES = 1 << 20  # the largest valid body (1000 basket ids of 256 chars) is well under this
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]  # the loaders' rule: fedtower.data.ids


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored


class FiltersBody(_Body):
    categories: list[Id] | None = Field(None, description="Keep items in any of these categories.")
    min_price: float | None = Field(None, allow_inf_nan=False)
    max_price: float | None = Field(None, allow_inf_nan=False)
    available: list[Id] | None = Field(None, description="Keep only these item ids (e.g. in stock).")


class RecommendBody(_Body):
    user: Id | None = Field(None, description="A user this node holds state for.")
    history: list[Id] | None = Field(
        None, min_length=1, max_length=1000, description="Instead of `user`: a new user's items, oldest first."
    )
    k: int = Field(10, ge=1, le=MAX_K)
    filters: FiltersBody | None = None
    explain: bool = False
    diversity: float = Field(0.0, ge=0.0, le=1.0, description="MMR weight; 0 = plain ranking.")
    category_cap: int | None = Field(None, ge=1, description="At most this many items per category.")
    novelty: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="Popularity penalty weight.")

    @model_validator(mode="after")
    def _one_of_user_or_history(self) -> RecommendBody:
        if (self.user is None) == (self.history is None):
            raise ValueError("give exactly one of 'user' (a known user) or 'history' (a new user's items)")
        return self


class ExplainBody(_Body):
    user: Id
    item: Id
    top: int = Field(3, ge=1, le=100)


class BundleBody(_Body):
    user: Id
    basket: list[Id] = Field(min_length=1, max_length=1000)
    k: int = Field(5, ge=1, le=MAX_K)
    allow_same_category: bool = False


class EventBody(_Body):
    user: Id
    item: Id
    behaviour: Literal[BEHAVIOURS]  # type: ignore[valid-type]
    timestamp: int | None = Field(None, ge=0, description="Seconds since the epoch; default now.")
    value: float | None = Field(None, allow_inf_nan=False, description="Rating (0.5-5) or dwell seconds.")


class NewItemBody(_Body):
    item: Id
    features: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        min_length=1, max_length=100_000, description="The catalogue's content features, in its feature order."
    )
    title: str = Field("", max_length=1000)
    categories: list[Id] | None = None
    price: float | None = Field(None, ge=0, allow_inf_nan=False)


class NewItemsBody(_Body):
    items: list[NewItemBody] = Field(min_length=1, max_length=1000)


class Item(BaseModel):
    item: str
    title: str
    score: float
    categories: list[str]
    explanation: list[dict]


class ItemsReply(BaseModel):
    items: list[Item]


class ContributionsReply(BaseModel):
    contributions: list[dict]


class Problem(BaseModel):
    """Every error has this one shape: `detail`, one readable line, and `problems`, one entry per problem
    with the field it concerns (null when the problem is not one field's)."""

    detail: str
    problems: list[dict]


def _json(payload: object, status: int = 200) -> Response:
    # json.dumps straight to bytes: FastAPI's generic encoder costs more than the scoring at 10^5 items.
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


def _problem(status: int, detail: str | list[dict], headers: dict | None = None) -> Response:
    """An error reply in the one Problem shape; `detail` is a message, or field problems {field, problem}."""
    if isinstance(detail, str):
        problems = [{"field": None, "problem": detail}]
    else:
        problems = list(detail)
        detail = "; ".join(f"{p['field']}: {p['problem']}" if p.get("field") else str(p["problem"]) for p in problems)
    response = _json({"detail": detail, "problems": problems}, status)
    response.headers.update(headers or {})
    return response


class _Unauthorized(Exception):
    """A missing or wrong bearer token (answered 401 before the body is read)."""


class _BodyLimit:
    """Refuse a declared body over `limit` bytes with 413 before anything reads it (pure ASGI: no per-request cost)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.limit:
                response = _problem(413, f"The request body must be at most {self.limit} bytes.")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(recommender, token: str | None, *, watch_interval: float = 1.0) -> FastAPI:
    """The API over `recommender`; `token=None` turns authentication off (only on explicit request).

    Every `watch_interval` seconds (0: never) the state dir is checked for a newer
    snapshot or user rows (Recommender.refresh), and what is newer swapped in.
    """
    expected = token.encode() if token is not None else None
    errors = {404: {"model": Problem}, 401: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}}
    swapping = asyncio.Lock()  # one reload or item addition at a time: each builds on the table it replaces

    async def reload(force: bool) -> None:
        async with swapping:
            prepared = await asyncio.to_thread(recommender.prepare_refresh, force)
            recommender.apply_refresh(prepared)  # on the loop thread, between requests

    async def follow_state() -> None:
        while True:
            await asyncio.sleep(watch_interval)
            try:
                await reload(force=False)
            except Exception:  # the server keeps serving what it has; /health shows load errors
                log.exception("Checking the state dir for a newer snapshot failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(follow_state()) if watch_interval > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="fedtower local serving API", version=__version__, docs_url=None, redoc_url=None,
                  description=__doc__, lifespan=lifespan)  # fmt: skip

    bearer = HTTPBearer(auto_error=False, description="The token given to `fedtower serve`.")

    async def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # async: no threadpool hop per request. HTTPBearer also puts the scheme into the OpenAPI schema.
        if expected is None:
            return
        # compare_digest: the time taken does not reveal how much of the token matched.
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise _Unauthorized()

    secured = [Depends(authorised)]
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> Response:
        return _problem(401, "Missing or wrong bearer token (header 'Authorization: Bearer <token>').",
                        {"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:  # an unknown path, a wrong method
        return _problem(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _problem(422, [_field_problem(e) for e in exc.errors()])

    @app.exception_handler(UnknownUserError)
    @app.exception_handler(UnknownItemError)
    async def _unknown(request: Request, exc: ValueError) -> Response:
        return _problem(404, str(exc))

    @app.exception_handler(ItemExistsError)
    async def _exists(request: Request, exc: ItemExistsError) -> Response:
        return _problem(409, str(exc))

    @app.exception_handler(ValueError)
    async def _rejected(request: Request, exc: ValueError) -> Response:
        return _problem(422, str(exc))

    @app.exception_handler(StateError)
    async def _state(request: Request, exc: StateError) -> Response:
        log.error("Serving refused: %s", exc)  # fail closed; the operator must look at the state
        return _problem(503, "The node's private state cannot be used; see the server log.")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.exception("Unexpected error serving %s", request.url.path)
        return _problem(500, "Internal error; see the server log.")

    @app.get("/health")
    async def health() -> dict:
        """Liveness and the snapshot served (generation, round); unauthenticated, so nothing about users.

        "degraded": still serving, but the newest snapshot (or state) could not be loaded; see reload_error.
        """
        status = recommender.status()
        return {"status": "degraded" if status["reload_error"] else "ok", **status}

    @app.get("/features", dependencies=secured)
    async def features() -> dict:
        """The catalogue's content features in the order `POST /items` takes them (public catalogue data)."""
        names = list(recommender.catalogue.feature_names)
        return {"count": recommender.catalogue.num_features, "features": names}

    @app.post("/reload", dependencies=secured, responses=errors)
    async def force_reload() -> Response:
        """Take in the state dir's newest item-tower snapshot, local items and user rows now."""
        await reload(force=True)
        status = recommender.status()
        if status["reload_error"]:
            return _problem(503, status["reload_error"])
        return _json(status)

    @app.post("/items", dependencies=secured, status_code=201, responses={**errors, 409: {"model": Problem}})
    async def add_items(body: NewItemsBody) -> Response:
        """Add items to the served catalogue, embedded from their content features (kept in the state dir)."""
        items = [item.model_dump() for item in body.items]
        async with swapping:
            prepared = await asyncio.to_thread(recommender.prepare_items, items)
            recommender.apply_refresh(prepared)
        return _json({"added": prepared.added, "items": len(recommender.catalogue)}, 201)

    @app.post("/recommend", dependencies=secured, response_model=ItemsReply, responses=errors)
    async def recommend(body: RecommendBody) -> Response:
        """Top-k items for a known `user` (seen items excluded), or for a new user's `history`."""
        options = {"filters": _filters(body.filters), "explain": body.explain, "diversity": body.diversity,
                   "category_cap": body.category_cap, "novelty": body.novelty}  # fmt: skip
        if body.user is not None:
            items = recommender.recommend(body.user, body.k, **options)
        else:
            items = recommender.recommend_for_history(body.history, body.k, **options)
        return _json({"items": [r.to_dict() for r in items]})

    @app.post("/explain", dependencies=secured, response_model=ContributionsReply, responses=errors)
    async def explain(body: ExplainBody) -> Response:
        """The `top` history items that contributed most to `item`'s score for `user`."""
        contributions = recommender.explain(body.user, body.item, top=body.top)
        return _json({"contributions": [c.to_dict() for c in contributions]})

    @app.post("/bundle", dependencies=secured, response_model=ItemsReply, responses=errors)
    async def bundle(body: BundleBody) -> Response:
        """`k` items that go with `basket` for `user` (no basket items, no basket categories unless allowed)."""
        items = recommender.complete(body.user, body.basket, body.k, allow_same_category=body.allow_same_category)
        return _json({"items": [r.to_dict() for r in items]})

    @app.post("/events", dependencies=secured, status_code=201, responses=errors)
    async def record(body: EventBody) -> Response:
        """Record one event: appended to the node's event log and applied to the user's embedding now.

        An unknown user is created on this node (served by pooling their history until a round trains them).
        """
        result = recommender.record(body.model_dump())
        return _json(result.to_dict(), 201)

    return app


def _field_problem(error: dict) -> dict:
    """One pydantic error as {"field": "filters.min_price", "problem": "..."}."""
    if error["type"] == "json_invalid":
        return {"field": "body", "problem": f"not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"}
    field = ".".join(str(p) for p in error["loc"][1:]) or "body"
    problem = error["msg"]
    if field == "body" and error["type"] in ("model_attributes_type", "dict_type"):
        problem = "the body must be a JSON object (and the request must say Content-Type: application/json)"
    return {"field": field, "problem": problem}


def _filters(body: FiltersBody | None) -> Filters | None:
    if body is None:
        return None
    return Filters(**body.model_dump())
