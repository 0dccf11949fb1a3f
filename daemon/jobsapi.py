"""The job control routes of the status API: GET /v1/jobs[/{job}], POST
/v1/jobs/{job}/pause|resume|cancel|priority, POST /v1/dlq/replay.

Served on the status listener (same auth). Reads job views from the dispatcher and asks
the supervisor to apply an action; it never changes a job itself. Unknown job 404, an
action the job's state does not allow 409, a bad body 400; every error is {"error": ...}.
"""
from __future__ import annotations

from typing import Any, Protocol

import orjson
from aiohttp import web

from .dispatch import PRIORITIES, Dispatcher, NoSuchJob, NotAllowed
from .jobs import Job, iso

MAX_BODY = 4096  # a priority body is a few bytes


class Controller(Protocol):
    dispatch: Dispatcher

    async def control_job(self, job_id: str, action: str,
                          priority: str | None = None) -> dict[str, Any]: ...

    def job_views(self) -> list[dict[str, Any]] | None: ...

    async def replay(self, of: str | None) -> list[tuple[str, bool]]: ...


def view(d: Dispatcher, found: Job | dict[str, Any]) -> dict[str, Any]:
    """One job as /v1/jobs and `alertd jobs` show it (active, or a finished summary)."""
    if isinstance(found, dict):
        s = found
        return {"job": s["job"], "file": s["file"], "state": s.get("status", "complete"),
                "priority": s.get("priority", "normal"), "rows": s["rows"],
                "rows_final": True, "delivered": s["delivered"], "rejected": s["rejected"],
                "dead": s["dead"], "cancelled": s.get("cancelled", 0),
                "possible_duplicates": s.get("possible_duplicates", 0), "progress": 1.0,
                "reason": s.get("reason"), "started_at": s.get("started_at"),
                "finished_at": s.get("finished_at"), "kind": s.get("kind", "file"),
                "replay_of": s.get("replay_of"), "replayed": s.get("replayed", 0)}
    j = found
    c = j.counts
    data = max(0, j.size - j.data_start)
    return {"job": j.id, "file": j.name, "state": d.state(j.id), "priority": d.priority[j.id],
            "rows": c.rows, "rows_final": False, "delivered": c.delivered,
            "rejected": c.rejected, "dead": c.dead, "cancelled": c.cancelled,
            "possible_duplicates": c.possible_duplicates,
            "progress": round(j.bytes_done / data, 4) if data else 1.0, "reason": j.failed,
            "started_at": iso(j.started_at), "finished_at": None, "kind": j.kind,
            "replay_of": j.replay_of, "replayed": 0}


def listing(d: Dispatcher) -> list[dict[str, Any]]:
    """Active jobs (queued, running, paused, cancelling), then the recently finished ones,
    each group oldest first."""
    active = [view(d, j) for j in sorted(d.jobs.values(), key=lambda j: int(j.id[1:]))]
    return active + [view(d, s) for s in d.recently_finished() if s["job"] not in d.jobs]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def add_routes(app: web.Application, ctl: Controller) -> None:
    """Register the /v1/jobs routes on the status application."""

    async def list_jobs(request: web.Request) -> web.Response:
        remote = ctl.job_views()  # a cluster node that does not plan: the planner's
        return web.json_response({"jobs": listing(ctl.dispatch) if remote is None else remote},
                                 dumps=_dumps)

    async def get_job(request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        remote = ctl.job_views()
        if remote is not None:
            found = next((j for j in remote if j["job"] == job_id), None)
            if found is None:
                return _error(404, f"no such job: {job_id}")
            return web.json_response(found, dumps=_dumps)
        found = ctl.dispatch.find(job_id)
        if found is None:
            return _error(404, f"no such job: {job_id}")
        return web.json_response(view(ctl.dispatch, found), dumps=_dumps)

    async def act(request: web.Request) -> web.Response:
        job_id, action = request.match_info["job"], request.match_info["action"]
        priority = None
        if action == "priority":
            raw = await request.content.read(MAX_BODY + 1)
            if len(raw) > MAX_BODY:
                return _error(400, f"body larger than {MAX_BODY} bytes")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return _error(400, 'body must be JSON: {"priority": "high"|"normal"|"low"}')
            priority = body.get("priority") if isinstance(body, dict) else None
            if priority not in PRIORITIES or set(body) != {"priority"}:
                return _error(400, f"priority must be one of {', '.join(PRIORITIES)}, "
                                   f'given as {{"priority": "high"}}')
        try:
            done = await ctl.control_job(job_id, action, priority)
        except NoSuchJob as e:
            return _error(404, str(e))
        except NotAllowed as e:
            return _error(409, str(e))
        return web.json_response(done, dumps=_dumps)

    async def start_replay(request: web.Request) -> web.Response:
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _error(400, f"body larger than {MAX_BODY} bytes")
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            body = None
        of = body.get("job") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) - {"job"} or \
                not (of is None or isinstance(of, str)):
            return _error(400, 'body must be empty or JSON: {"job": "j000042"}')
        try:
            started = await ctl.replay(of)
        except NoSuchJob as e:
            return _error(404, str(e))
        except NotAllowed as e:
            return _error(409, str(e))
        jobs = [dict(view(ctl.dispatch, found), started=new) for r, new in started
                if (found := ctl.dispatch.find(r)) is not None]
        return web.json_response({"jobs": jobs}, dumps=_dumps,
                                 status=201 if any(new for _, new in started) else 200)

    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_post("/v1/dlq/replay", start_replay)
    app.router.add_get("/v1/jobs/{job}", get_job)
    app.router.add_post("/v1/jobs/{job}/{action:pause|resume|cancel|priority}", act)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
