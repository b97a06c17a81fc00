"""The ``mayak`` command line: serve, demo, migrations, workspaces, keys, import and replay."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mayak import logs, runtime
from mayak.config import Settings
from mayak.db.migrate import upgrade_async
from mayak.errors import EventRejected, MayakError
from mayak.platform import Mayak

app = typer.Typer(
    help="Mayak: connected customer-experience platform.", no_args_is_help=True, add_completion=False
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
workspace_app = typer.Typer(help="Workspaces.", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
import_app = typer.Typer(help="Bulk import.", no_args_is_help=True)
bot_app = typer.Typer(help="Bots: validate, test and publish a bot folder.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(bot_app, name="bot")
app.add_typer(workspace_app, name="workspace")
app.add_typer(key_app, name="key")
app.add_typer(import_app, name="import")
console = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


def _run(factory: Callable[[Mayak], Awaitable[T]], *, migrate: bool = True) -> T:
    async def main() -> T:
        settings = Settings.from_env()
        logs.configure(settings.log_level)
        if migrate:
            await upgrade_async(settings.database_url)
        mayak = Mayak(settings)
        try:
            return await factory(mayak)
        finally:
            await mayak.close()

    try:
        return asyncio.run(main())
    except MayakError as exc:
        console.print(f"[red]error[/red] {exc.code}: {exc.message}")
        raise typer.Exit(2) from exc


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    settings = Settings.from_env()
    asyncio.run(upgrade_async(settings.database_url, revision))
    console.print(f"database at [bold]{settings.database_url}[/bold] is at revision {revision}")


@workspace_app.command("create")
def workspace_create(
    name: str,
    region: str = typer.Option("US", help="Default region for national phone numbers (ISO 3166)"),
    as_json: bool = typer.Option(False, "--json", help="Print {id, write_key, secret_key} as JSON"),
) -> None:
    """Create a workspace with one write key and one secret key (shown once)."""
    ws = _run(lambda m: m.workspaces.create_workspace(name, {"default_region": region.upper()}))
    if as_json:
        _print_json({"id": ws["id"], "write_key": ws["write_key"], "secret_key": ws["secret_key"]})
    else:
        console.print(f"workspace [bold]{ws['id']}[/bold] {name}")
        console.print(
            f"write key:  {ws['write_key']}\nsecret key: {ws['secret_key']}  (shown once; store it)"
        )


def _load_bot(path: Path) -> Any:
    from mayak.bots.loader import load_folder

    loaded = load_folder(path)
    for issue in loaded.issues:
        sys.stdout.write(f"{issue}\n")
    return loaded


@bot_app.command("validate")
def bot_validate(path: Path) -> None:
    """Check a bot folder against the schema and the cross-file rules; prints file:line: reason."""
    loaded = _load_bot(path)
    if not loaded.ok:
        console.print(f"[red]{len(loaded.issues)} problem(s)[/red]")
        raise typer.Exit(1)
    flows = len(loaded.definition["flows"])
    console.print(f"[green]ok[/green] bot {loaded.name}: {flows} flows, {len(loaded.tests)} tests")


@bot_app.command("test")
def bot_test(path: Path) -> None:
    """Run the bot's conversation tests (the ``tests:`` sections of its YAML files)."""
    from mayak.bots.testing import run_tests

    loaded = _load_bot(path)
    if not loaded.ok:
        raise typer.Exit(1)
    results = run_tests(loaded)
    failed = 0
    for res in results:
        mark = "[green]pass[/green]" if res.passed else "[red]FAIL[/red]"
        console.print(f"{mark} {res.file}:{res.line} {res.name}")
        for failure in res.failures:
            console.print(f"     {failure}")
        failed += not res.passed
    console.print(f"{len(results) - failed} passed, {failed} failed")
    if failed or not results:
        raise typer.Exit(1)


@bot_app.command("publish")
def bot_publish(
    path: Path,
    workspace: str = typer.Option(..., "--workspace", help="Workspace id"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Publish the bot as a new immutable version (refused when it does not validate)."""
    loaded = _load_bot(path)
    if not loaded.ok:
        console.print(f"[red]refused[/red]: {len(loaded.issues)} problem(s)")
        raise typer.Exit(1)

    async def publish(m: Mayak) -> dict[str, Any]:
        await m.workspaces.get_workspace(workspace)
        return await m.bots.publish(workspace, loaded.definition)

    published = _run(publish)
    if as_json:
        _print_json(published)
    else:
        state = "unchanged" if published["unchanged"] else "published"
        console.print(
            f"{state}: bot {published['name']} ({published['id']}) version {published['current_version']}"
        )


@key_app.command("create")
def key_create(
    workspace: str = typer.Option(..., "--workspace", help="Workspace id (ws_…)"),
    kind: str = typer.Option(..., "--kind", help="write or secret"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Issue a new key; its plaintext is shown only now."""
    issued = _run(lambda m: m.workspaces.create_key(workspace, kind))
    if as_json:
        _print_json({"id": issued.id, "kind": issued.kind, "key": issued.plaintext})
    else:
        console.print(f"{issued.kind} key {issued.id}: {issued.plaintext}")


@key_app.command("revoke")
def key_revoke(key_id: str) -> None:
    """Revoke a key by its id (key_…); it stops working at once."""
    _run(lambda m: m.workspaces.revoke_key(key_id))
    console.print(f"revoked {key_id}")


@import_app.command("events")
def import_events(
    path: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="JSON Lines: one Segment event per line"
    ),
    workspace: str = typer.Option(..., "--workspace"),
    chunk: int = typer.Option(1000, help="Events per transaction"),
) -> None:
    """Import events from a JSON Lines file, then process them into profiles."""
    from mayak.ingest.segment import normalise_event
    from mayak.timeutil import now_ms

    async def run(m: Mayak) -> None:
        await m.workspaces.get_workspace(workspace)
        total_bytes = path.stat().st_size
        accepted = rejected = duplicates = 0
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("importing (bytes)", total=total_bytes)
            batch = []
            with path.open("rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    progress.advance(task, len(line))
                    if not line.strip():
                        continue
                    try:
                        raw = orjson.loads(line)
                        batch.append(
                            normalise_event(
                                raw,
                                workspace_id=workspace,
                                received_at=now_ms(),
                                batch_sent_at=None,
                                forced_type=None,
                                actor="import",
                                max_event_bytes=m.settings.max_event_bytes,
                                max_depth=m.settings.max_json_depth,
                            )
                        )
                    except (orjson.JSONDecodeError, EventRejected) as exc:
                        rejected += 1
                        reason = (
                            exc.code + " at " + str(exc.param)
                            if isinstance(exc, EventRejected)
                            else "invalid JSON"
                        )
                        console.print(f"line {lineno}: {reason}")
                    if len(batch) >= chunk:
                        res = await m.writer.submit(batch)
                        accepted, duplicates, batch = accepted + res.accepted, duplicates + res.duplicates, []
                if batch:
                    res = await m.writer.submit(batch)
                    accepted, duplicates = accepted + res.accepted, duplicates + res.duplicates
            lag = await m.pipeline.lag()
            ptask = progress.add_task("processing", total=lag)
            while True:
                done = await m.pipeline.run_until_idle_once()
                progress.advance(ptask, done)
                if not done:
                    break
        console.print(f"accepted {accepted}, duplicates {duplicates}, rejected {rejected}")

    _run(run)


@app.command("replay")
def replay(workspace: str = typer.Option(..., "--workspace")) -> None:
    """Rebuild every profile of a workspace from its event log."""
    count = _run(lambda m: m.customers.replay(workspace))
    console.print(f"replayed {count} events")


def _data_dir() -> Path:
    return Path(os.environ.get("MAYAK_DATA_DIR", "./data"))


async def ensure_demo(m: Mayak, customers: int) -> dict[str, Any]:
    """Create Demo Motors once; later runs reuse it and its keys (kept in the data directory)."""
    from mayak import demo
    from mayak.db.schema import customers as customer_rows
    from mayak.db.schema import identities
    from mayak.eventlog import NewEvent
    from mayak.timeutil import now_ms

    keys_file = _data_dir() / "demo-workspace.json"
    if keys_file.exists():
        saved = orjson.loads(keys_file.read_bytes())
        try:
            await m.workspaces.get_workspace(saved["id"])
            await m.workspaces.authenticate(saved["write_key"])
            await m.workspaces.authenticate(saved["secret_key"])
            return dict(saved)
        except MayakError:
            console.print("saved demo keys no longer work; creating the demo workspace again")
    ws = await m.workspaces.create_workspace(demo.WORKSPACE_NAME, {"default_region": "GB"})
    events, stages = demo.generate(ws["id"], customers)
    with console.status(f"loading {len(events)} demo events for {customers} customers"):
        for start in range(0, len(events), 2000):
            await m.writer.submit(events[start : start + 2000])
        await m.pipeline.run_until_idle()
        async with m.db.read() as conn:
            rows = await conn.execute(
                sa.select(identities.c.value, customer_rows.c.id)
                .join(customer_rows, customer_rows.c.key == identities.c.customer_key)
                .where(identities.c.workspace_id == ws["id"], identities.c.kind == "user_id")
            )
            owners = dict(rows.all())
        now = now_ms()
        stage_events = [
            NewEvent(
                workspace_id=ws["id"],
                type="customer.stage_set",
                timestamp=now,
                received_at=now,
                payload={"stage": stage},
                source="admin",
                actor="demo",
                customer_id=owners[uid],
            )
            for uid, stage in stages.items()
            if uid in owners
        ]
        await m.writer.submit(stage_events)
        await m.pipeline.run_until_idle()
    saved = {"id": ws["id"], "name": ws["name"], "write_key": ws["write_key"], "secret_key": ws["secret_key"]}
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    keys_file.write_bytes(orjson.dumps(saved, option=orjson.OPT_INDENT_2))
    keys_file.chmod(0o600)
    return saved


DEMO_GREETING = (
    "Hello! I am the Demo Motors assistant: book a service visit, ask whether your car is ready, "
    "our hours and prices, or ask for a person. Пишите и по-русски."
)


async def ensure_demo_bot(m: Mayak, ws: dict[str, Any]) -> dict[str, Any]:
    """The Demo Motors bot on a web-chat channel, and the demo DMS wired both ways: the bot calls it
    with a token (integration secrets), it reports finished work through a signed hook.
    Idempotent: publishing the same bot again keeps its version; the rest is created once."""
    import secrets as pysecrets
    from importlib import resources

    from mayak.bots.loader import load_folder
    from mayak.integrations.calls import integrations

    folder = resources.files("mayak.bots").joinpath("examples/demo_motors")
    loaded = load_folder(Path(str(folder)))
    if not loaded.ok:  # pragma: no cover - the shipped bot is tested
        raise RuntimeError("; ".join(map(str, loaded.issues)))
    bot = await m.bots.publish(ws["id"], loaded.definition)
    channel = await m.channels.first_of_type(ws["id"], "webchat")
    if channel is None:
        created = await m.channels.create(
            ws["id"],
            type="webchat",
            name="Demo Motors web chat",
            config={"title": "Demo Motors", "greeting": DEMO_GREETING},
            bot_id=bot["id"],
        )
        channel_id = created["id"]
    else:
        channel_id = channel.id
    dms_file = _data_dir() / "demo-dms.json"
    dms = orjson.loads(dms_file.read_bytes()) if dms_file.exists() else {}
    services = integrations(m)
    if dms.get("workspace_id") != ws["id"]:
        hook = await services.hooks.create(
            ws["id"],
            name="Demo DMS",
            mapping={
                "event": "Service Completed",
                "identity": {"kind": "dms_customer", "path": "$.customer_ref"},
            },
        )
        dms = {
            "workspace_id": ws["id"],
            "token": pysecrets.token_urlsafe(24),
            "hook_id": hook["id"],
            "hook_secret": hook["signing_secret"],
        }
        await services.secrets.put(ws["id"], "dms_token", dms["token"])
        dms_file.write_bytes(orjson.dumps(dms, option=orjson.OPT_INDENT_2))
        dms_file.chmod(0o600)
    base = m.settings.public_url.rstrip("/")
    await services.secrets.put(ws["id"], "dms_base_url", f"{base}/demo/dms")
    return dms | {"bot_id": bot["id"], "channel_id": channel_id}


def _banner(settings: Settings, ws: dict[str, Any]) -> None:
    base = settings.public_url.rstrip("/")
    console.print(f"\n[bold]Mayak[/bold] — demo workspace [bold]{ws['name']}[/bold] ({ws['id']})")
    console.print(f"  API:         {base}/v1/")
    console.print(f"  OpenAPI:     {base}/openapi.json   docs: {base}/docs")
    console.print(f"  Metrics:     {base}/metrics   health: {base}/healthz")
    console.print(f"  write key:   {ws['write_key']}")
    console.print(f"  secret key:  {ws['secret_key']}")
    console.print(
        f"  try:         curl -s {base}/v1/customers?limit=3 -H 'Authorization: Bearer {ws['secret_key']}'"
    )
    demo = ws.get("demo")
    if demo:
        console.print(f"  web chat:    {base}/v1/webchat/{demo['channel_id']}/demo?key={ws['write_key']}")
        console.print(
            f"  DMS orders:  {base}/demo/dms/orders/all  (complete one: POST /demo/dms/orders/WO-…/complete)"
        )
    console.print("")


@app.command("demo")
def demo_command(
    customers: int = typer.Option(300, help="How many synthetic customers"),
    serve_after: bool = typer.Option(False, "--serve", help="Start the server afterwards"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create (or find) the Demo Motors workspace and print its keys."""
    settings = Settings.from_env()

    async def setup(m: Mayak) -> dict[str, Any]:
        ws = await ensure_demo(m, customers)
        return ws | {"demo": await ensure_demo_bot(m, ws)}

    ws = _run(setup)
    if as_json:
        _print_json(ws)
    else:
        _banner(settings, ws)
    if serve_after:
        from mayak import demo_dms

        dms = demo_dms.Dms(
            token=ws["demo"]["token"],
            hook_url=f"{settings.public_url.rstrip('/')}/v1/hooks/{ws['demo']['hook_id']}",
            hook_secret=ws["demo"]["hook_secret"],
        )
        _serve(settings.host, settings.port, True, extra=[demo_dms.router(dms)])


@app.command("worker")
def worker() -> None:
    """Run the pipeline, outbox and timer loops without the HTTP API.

    Pair with ``mayak serve --no-workers`` (and ``MAYAK_INLINE_PIPELINE=0``) to put the API and the
    profile pipeline in separate processes; on PostgreSQL run as many of each as you like.
    """
    import signal

    settings = Settings.from_env()
    logs.configure(settings.log_level)
    asyncio.run(upgrade_async(settings.database_url))

    async def main() -> None:
        mayak_obj = Mayak(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await mayak_obj.start(workers=True)
        runtime.tune_for_server()
        console.print("worker running (pipeline, outbox, timers)")
        try:
            await stop.wait()
        finally:
            await mayak_obj.close()

    asyncio.run(main())


@app.command("serve")
def serve(
    host: str = typer.Option(None, help="Bind address (MAYAK_HOST, default 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (MAYAK_PORT, default 8000)"),
    workers: bool = typer.Option(True, "--workers/--no-workers", help="Run pipeline, outbox and timer loops"),
) -> None:
    """Run the HTTP API and the worker loops in one process."""
    _serve(host, port, workers)


def _serve(host: str | None, port: int | None, workers: bool, extra: list[Any] | None = None) -> None:
    import uvicorn

    from mayak.api.app import create_app

    settings = Settings.from_env()
    logs.configure(settings.log_level)
    if settings.secret_key is None and settings.sqlite_path() is not None:
        console.print(
            "[yellow]MAYAK_SECRET_KEY is not set: secrets are encrypted with a key file in the data folder[/]"
        )
    asyncio.run(upgrade_async(settings.database_url))
    mayak_obj = Mayak(settings)
    application = create_app(mayak_obj, workers=workers)
    for router in extra or []:
        application.include_router(router)
    config = uvicorn.Config(
        application,
        host=host or settings.host,
        port=port or settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=5,
        ws_per_message_deflate=False,  # chat frames are small: compressing them costs more than it saves
    )
    console.print(f"serving on http://{host or settings.host}:{port or settings.port}")
    runtime.tune_for_server()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    app()
