"""The dashboard's HTTP side: the page, its live stream, the stop control and /metrics, on one listener.

aiohttp runs in a thread of its own with its own event loop, so that the
flashing loop (blocking, in the main thread) runs exactly as it does without
a screen; the two meet only in the :class:`Station`, which is made for it.
The socket is bound in the caller's thread, so that an address in use is the
station's one-line error at start-up, not a thread's traceback.

Routes: ``GET /`` (the page), ``GET /events`` (Server-Sent Events: the board,
each time it changes, at most once a second while cards are written),
``POST /stop`` (stop after the cards in progress), ``GET /metrics``
(Prometheus), and ``POST /sign-in`` (the token, for a dashboard that needs
one). Who may do what is :mod:`access`'s decision; this module only asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imageprov.errors import ImageprovError
from imageprov.line.dashboard import page
from imageprov.line.dashboard.access import COOKIE, Access, Address, Verdict
from imageprov.line.dashboard.metrics import StationMetrics
from imageprov.line.station import Listener, Station

TICK = 1.0  # seconds between two looks at the station while nothing tells of a change (elapsed times move)
KEEPALIVE = 15.0  # seconds of silence after which a stream says it is alive (and finds a screen gone)
BODY_LIMIT = 4096  # a form with a token or a CSRF token
SESSION_DAYS = 30  # a screen on the wall signs in once a month; a new token ends every session sooner
START_SECONDS = 30.0
HEADERS = {
    # Nothing but this page's own script and styles; no frame around it (a stop button under a decoy).
    "Content-Security-Policy": f"default-src 'none'; script-src '{page.SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class DashboardError(ImageprovError):
    """The dashboard cannot listen or start."""


class Dashboard(Listener):
    """The station's screen and metrics, served from a thread; a context manager (``start`` on entry)."""

    def __init__(self, station: Station, address: Address, access: Access) -> None:
        self.station = station
        self.address = address
        self.access = access
        self.metrics = StationMetrics(station)
        self.url = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Event | None = None  # replaced at each change: every stream waits on the current one
        self._closing = False

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> str:
        """Listen, serve from a new thread, and return the dashboard's URL."""
        sock = _bind(self.address)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(sock, ready), name="imageprov-dashboard", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=START_SECONDS)
        except Exception as exc:  # whatever kept it from starting, said in one line
            sock.close()
            raise DashboardError(
                f"the dashboard did not start on {self.address}: {exc}", hint="--debug shows why; or run without it"
            ) from exc
        self.station.listen(self)
        self.station.listen(self.metrics)
        return self.url

    def close(self) -> None:
        """Push the last state to every screen, then stop serving."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.station.forget(self)
        self.station.forget(self.metrics)
        # Whatever goes wrong in saying goodbye to the screens, the line's own result (and error) is what counts.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        thread.join(timeout=10)
        self._loop = self._thread = None

    # -- Listener: from the flashing thread ---------------------------------------------------

    def changed(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: no screen left to tell
                loop.call_soon_threadsafe(self._wake)

    # -- in the dashboard's thread ----------------------------------------------------------------

    def _serve(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._changed = asyncio.Event()
            self._runner = web.AppRunner(self._app(), access_log=None)  # requests are not the line log
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.SockSite(self._runner, sock, shutdown_timeout=2.0).start())
        except Exception as exc:
            ready.set_exception(exc)
            loop.close()
            return
        self._loop = loop
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        self._closing = True
        self._wake()  # every stream sends the last board and ends
        if self._runner is not None:
            await self._runner.cleanup()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=BODY_LIMIT, middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/events", self._events)
        app.router.add_post("/stop", self._stop)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/sign-in", self._sign_in)
        return app

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        verdict = self.access.request(
            host=request.headers.get("Host"),
            authorization=request.headers.get("Authorization"),
            cookie=request.cookies.get(COOKIE),
        )
        if verdict is Verdict.SIGN_IN and request.path == "/sign-in":
            verdict = Verdict.ALLOW  # the one request that brings the token
        if verdict is Verdict.ALLOW and request.method == "POST":
            verdict = await self._post(request)
        if verdict is Verdict.ALLOW:
            response = await handler(request)
        elif verdict is Verdict.SIGN_IN:
            response = _html(page.sign_in_page(wrong=False), status=401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="imageprov line station"'
        elif verdict is Verdict.WRONG_HOST:
            response = web.Response(status=403, text=f"this dashboard answers on loopback only: open {self.url}\n")
        else:
            response = web.Response(status=403, text="refused: this request did not come from the dashboard's page\n")
        if not response.prepared:
            response.headers.update(HEADERS)
        return response

    async def _post(self, request: web.Request) -> Verdict:
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if request.path == "/sign-in":  # it brings the token: only where it comes from is checked
            return Verdict.ALLOW if self.access.same_origin(host=host, origin=origin) else Verdict.FORGED
        csrf = (await request.post()).get("csrf")
        return self.access.post(
            host=host,
            origin=origin,
            csrf=csrf if isinstance(csrf, str) else None,
            authorization=request.headers.get("Authorization"),
        )

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return _html(page.page(self.station.snapshot(), self.access.csrf))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={**HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}  # nginx: no buffering
        )
        await response.prepare(request)
        sent, quiet = "", 0.0
        try:
            await response.write(b"retry: 2000\n\n")  # milliseconds before the browser connects again
            while True:
                changed, closing = self._changed, self._closing  # before the snapshot: a change after it wakes us
                board = page.board(self.station.snapshot(), self.access.csrf)
                if board != sent:
                    await response.write(_event("board", board))
                    sent, quiet = board, 0.0
                elif quiet >= KEEPALIVE:
                    await response.write(b": alive\n\n")
                    quiet = 0.0
                if closing or changed is None:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), TICK)
                quiet += TICK
        except ConnectionResetError:
            pass  # the screen went away
        return response

    async def _stop(self, request: web.Request) -> web.StreamResponse:
        self.station.ask_stop()
        raise web.HTTPSeeOther("/")

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _sign_in(self, request: web.Request) -> web.StreamResponse:
        token = (await request.post()).get("token")
        if self.access.token is None:
            raise web.HTTPSeeOther("/")
        if not isinstance(token, str) or not self.access.sign_in(token):
            return _html(page.sign_in_page(wrong=True), status=401)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE, self.access.session, httponly=True, samesite="Strict", path="/", max_age=SESSION_DAYS * 86400
        )
        return response


def _bind(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server((address.host, address.port), family=family, reuse_port=False)
    except OSError as exc:
        raise DashboardError(
            # Not exc.strerror: create_server adds the address again to it.
            f"cannot listen on {address} for the dashboard: {os.strerror(exc.errno) if exc.errno else exc}",
            hint="another program has that port: choose another with --dashboard HOST:PORT (0: any free port)",
        ) from exc


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _event(name: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {name}\n{lines}\n".encode()
