"""vkeys: the admin command line for virtual keys and the user and team budgets above them,
over gRPC (keys.v1 KeyService / UsageService / BudgetService).

The server address comes from --addr or EXTAUTHZ_ADDR (default 127.0.0.1:9191), the admin token
from --token or EXTAUTHZ_ADMIN_TOKEN. Output is a readable table, or JSON with --json. Errors
print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime

import grpc
from google.protobuf.message import Message

from keys.v1 import keys_pb2
from vkeys import format as fmt
from vkeys.api import Api, explain, open_channel

DEFAULT_ADDR = "127.0.0.1:9191"
DEFAULT_TIMEOUT_S = 10.0
INT32_MAX = 2**31 - 1
SCOPES = ("user", "team")


class CliError(Exception):
    """A mistake in the command line that argparse cannot see; one line, exit 1."""


def emit(args: argparse.Namespace, message: Message, text: str) -> None:
    print(json.dumps(fmt.as_dict(message), indent=2) if args.json else text)


# ---------------------------------------------------------------- commands


OPTIONAL_FIELDS = (
    ("expires_days", "expires_days"),
    ("max_budget", "max_budget"),
    ("tpm", "tpm_limit"),
    ("rpm", "rpm_limit"),
    ("parallel", "max_parallel_requests"),
    ("enforce", "enforce"),
)


def set_given(request: Message, args: argparse.Namespace) -> None:
    """Sets only the optional fields whose flag was given (left out: the server decides)."""
    for flag, field in OPTIONAL_FIELDS:
        value = getattr(args, flag)
        if value is not None:
            setattr(request, field, value)


def model_limit(text: str) -> tuple[str, keys_pb2.ModelLimit]:
    """`MODEL=RPM:TPM` (either may be empty or 0: no limit), e.g. `gpt-4o=10:20000`."""
    model, sep, limits = text.rpartition("=")
    rpm, colon, tpm = limits.partition(":")
    if not sep or not model or not colon or not all(v.isdigit() for v in (rpm or "0", tpm or "0")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL=RPM:TPM, e.g. gpt-4o=10:20000")
    return model, keys_pb2.ModelLimit(rpm_limit=int(rpm or 0), tpm_limit=int(tpm or 0))


def model_limits(
    given: list[tuple[str, keys_pb2.ModelLimit]] | None,
) -> dict[str, keys_pb2.ModelLimit]:
    return dict(given or [])


def cmd_create(api: Api, args: argparse.Namespace) -> int:
    request = keys_pb2.CreateKeyRequest(
        name=args.name,
        user_id=args.user_id,
        team_id=args.team_id,
        allowed_models=args.model or [],
        metadata=dict(args.metadata or []),
        budget_duration=args.budget_duration,
    )
    set_given(request, args)
    for model, limit in model_limits(args.model_limit).items():
        request.model_limits[model].CopyFrom(limit)
    reply = api.call(api.keys.CreateKey, request)
    emit(args, reply, fmt.new_key("created", reply))
    return 0


def cmd_list(api: Api, args: argparse.Namespace) -> int:
    request = keys_pb2.ListKeysRequest(
        user_id=args.user_id,
        team_id=args.team_id,
        status=args.status,
        page_size=args.page_size,
        page_token=args.page_token,
    )
    reply = api.call(api.keys.ListKeys, request)
    keys = list(reply.keys)
    while args.all and reply.next_page_token:
        request.page_token = reply.next_page_token
        reply = api.call(api.keys.ListKeys, request)
        keys.extend(reply.keys)
    result = keys_pb2.ListKeysResponse(keys=keys, next_page_token=reply.next_page_token)
    text = fmt.key_table(keys) if keys else "no keys"
    if reply.next_page_token:
        text += f"\n\nmore: vkeys list --page-token {reply.next_page_token} (or --all)"
    emit(args, result, text)
    return 0


def cmd_show(api: Api, args: argparse.Namespace) -> int:
    data = api.call(api.keys.GetKey, keys_pb2.GetKeyRequest(id=args.key_id))
    emit(args, data, fmt.key_details(data))
    return 0


def update_request(args: argparse.Namespace) -> keys_pb2.UpdateKeyRequest:
    request = keys_pb2.UpdateKeyRequest(id=args.key_id)
    set_given(request, args)
    if args.name is not None:
        request.name = args.name
    if args.budget_duration is not None:
        request.budget_duration = args.budget_duration
    if args.model is not None:
        request.allowed_models.CopyFrom(keys_pb2.ModelList(models=args.model))
    if args.metadata is not None or args.clear_metadata:
        request.metadata.CopyFrom(keys_pb2.Metadata(entries=dict(args.metadata or [])))
    if args.model_limit is not None or args.clear_model_limits:
        request.model_limits.CopyFrom(keys_pb2.ModelLimits(limits=model_limits(args.model_limit)))
    if [field.name for field, _ in request.ListFields()] in ([], ["id"]):
        raise CliError("nothing to update: give at least one field flag (see vkeys update -h)")
    return request


def cmd_update(api: Api, args: argparse.Namespace) -> int:
    data = api.call(api.keys.UpdateKey, update_request(args))
    emit(args, data, f"updated key {data.id}\n\n{fmt.key_details(data)}")
    return 0


def cmd_revoke(api: Api, args: argparse.Namespace) -> int:
    data = api.call(api.keys.RevokeKey, keys_pb2.RevokeKeyRequest(id=args.key_id))
    emit(args, data, f"revoked key {data.id}\n\n{fmt.key_details(data)}")
    return 0


def cmd_rotate(api: Api, args: argparse.Namespace) -> int:
    request = keys_pb2.RotateKeyRequest(id=args.key_id, grace_seconds=args.grace_seconds)
    reply = api.call(api.keys.RotateKey, request)
    old = (
        f" The old key works for {args.grace_seconds} more seconds."
        if args.grace_seconds
        else " The old key no longer works."
    )
    emit(args, reply, fmt.new_key("rotated", reply, old))
    return 0


def cmd_delete(api: Api, args: argparse.Namespace) -> int:
    reply = api.call(api.keys.DeleteKey, keys_pb2.DeleteKeyRequest(id=args.key_id))
    emit(args, reply, f"deleted key {reply.id}")
    return 0


def cmd_validate(api: Api, args: argparse.Namespace) -> int:
    key = args.key if args.key not in (None, "-") else sys.stdin.readline().strip()
    reply = api.call(api.keys.ValidateKey, keys_pb2.ValidateKeyRequest(key=key))
    verdict = "valid" if reply.valid else f"invalid: {reply.error or 'invalid_api_key'}"
    parts = [f"{verdict} (key id {reply.key_id or '-'})"]
    if reply.HasField("key_data"):
        parts.append(fmt.key_details(reply.key_data))
    emit(args, reply, "\n\n".join(parts))
    return 0 if reply.valid else 1


def cmd_usage(api: Api, args: argparse.Namespace) -> int:
    given = {"key_id": args.key_id, "user_id": args.user_id, "team_id": args.team_id}
    chosen = [(field, value) for field, value in given.items() if value]
    if len(chosen) != 1:
        raise CliError("give exactly one of KEY_ID, --user-id or --team-id")
    field, value = chosen[0]
    request = keys_pb2.GetUsageRequest(days=args.days, **{field: value})
    reply = api.call(api.usage.GetUsage, request)
    if args.csv:
        write_csv(fmt.USAGE_CSV_COLUMNS, fmt.usage_csv_rows(reply.rows))
        return 0
    subject = f"{field.removesuffix('_id')} {value}"
    emit(args, reply, fmt.usage_report(subject, reply, all_days=args.all_days))
    return 0


def write_csv(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(header)
    out.writerows(rows)


EXPORT_COLUMNS = ("key_id", "key_name", "user_id", "team_id", *fmt.USAGE_CSV_COLUMNS)


def cmd_export(api: Api, args: argparse.Namespace) -> int:
    """Every key's usage per day and model since a date, as CSV: one GetUsage per key
    (ListKeys pages through the keys, the filters narrowing them)."""
    try:
        since = date.fromisoformat(args.since)
        until = date.fromisoformat(args.until) if args.until else datetime.now(UTC).date()
    except ValueError as err:
        raise CliError(f"--since/--until: {err} (use YYYY-MM-DD)") from None
    if since > until:
        raise CliError("--since is after --until")
    days = (datetime.now(UTC).date() - since).days + 1
    if days < 1:
        raise CliError("--since is in the future")
    listing = keys_pb2.ListKeysRequest(user_id=args.user_id, team_id=args.team_id, page_size=200)
    rows: list[list[str]] = []
    while True:
        page = api.call(api.keys.ListKeys, listing)
        for key in page.keys:
            usage = api.call(api.usage.GetUsage, keys_pb2.GetUsageRequest(key_id=key.id, days=days))
            for row in fmt.usage_csv_rows(usage.rows):
                if since.isoformat() <= row[0] <= until.isoformat():
                    rows.append([key.id, key.name, key.user_id, key.team_id, *row])
        if not page.next_page_token:
            break
        listing.page_token = page.next_page_token
    write_csv(EXPORT_COLUMNS, rows)
    return 0


def current_budget(api: Api, scope: str, scope_id: str) -> keys_pb2.Budget | None:
    try:
        return api.call(api.budgets.GetBudget, keys_pb2.GetBudgetRequest(scope=scope, id=scope_id))
    except grpc.RpcError as err:
        if isinstance(err, grpc.Call) and err.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise


BUDGET_FLAGS = (
    ("max_budget", "max_budget"),
    ("duration", "budget_duration"),
    ("rpm", "rpm_limit"),
    ("tpm", "tpm_limit"),
    ("parallel", "max_parallel_requests"),
)


def budget_request(
    args: argparse.Namespace, current: keys_pb2.Budget | None
) -> keys_pb2.SetBudgetRequest:
    """SetBudget replaces the whole configuration; here a flag left out keeps the current
    value (a new budget: none), as `vkeys update` changes only what it is given. Sending
    the same duration back keeps the current period."""
    request = keys_pb2.SetBudgetRequest(scope=args.scope, id=args.id)
    for flag, field in BUDGET_FLAGS:
        value = getattr(args, flag)
        if value is None and current is not None:
            value = getattr(current, field)
        if value is not None:
            setattr(request, field, value)
    return request


def cmd_budget_set(api: Api, args: argparse.Namespace) -> int:
    current = current_budget(api, args.scope, args.id)
    budget = api.call(api.budgets.SetBudget, budget_request(args, current))
    verb = "created" if current is None else "updated"
    emit(args, budget, f"{verb} {budget.scope} budget {budget.id}\n\n{fmt.budget_details(budget)}")
    return 0


def cmd_budget_get(api: Api, args: argparse.Namespace) -> int:
    request = keys_pb2.GetBudgetRequest(scope=args.scope, id=args.id)
    budget = api.call(api.budgets.GetBudget, request)
    emit(args, budget, fmt.budget_details(budget))
    return 0


def cmd_budget_list(api: Api, args: argparse.Namespace) -> int:
    reply = api.call(api.budgets.ListBudgets, keys_pb2.ListBudgetsRequest(scope=args.scope))
    text = fmt.budget_table(reply.budgets) if reply.budgets else f"no {args.scope} budgets"
    emit(args, reply, text)
    return 0


def cmd_budget_delete(api: Api, args: argparse.Namespace) -> int:
    request = keys_pb2.DeleteBudgetRequest(scope=args.scope, id=args.id)
    reply = api.call(api.budgets.DeleteBudget, request)
    emit(args, reply, f"deleted {reply.scope} budget {reply.id}")
    return 0


# ---------------------------------------------------------------- arguments


def int32(text: str) -> int:
    value = int(text)
    if not -INT32_MAX - 1 <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range")
    return value


def pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def common_options(defaults: bool) -> argparse.ArgumentParser:
    """Options valid before or after the subcommand; sub-parsers leave unset ones alone."""
    parser = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--addr", default=default(None), help="server host:port (EXTAUTHZ_ADDR)")
    parser.add_argument("--token", default=default(None), help="admin token (EXTAUTHZ_ADMIN_TOKEN)")
    parser.add_argument(
        "--user",
        default=default(None),
        help="act for this user only (sends x-user-id): other users' keys read as not found, "
        "and of budgets only the user's own can be read",
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON")
    parser.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT_S), help="seconds")
    parser.add_argument("--tls-ca", default=default(None), help="CA file: use TLS")
    parser.add_argument("--tls-cert", default=default(None), help="client certificate (mTLS)")
    parser.add_argument("--tls-key", default=default(None), help="client private key (mTLS)")
    return parser


def limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expires-days", type=int32, help="expire this many days from now")
    parser.add_argument("--model", action="append", help="allowed model (repeat; '*' for all)")
    parser.add_argument("--max-budget", type=float, help="USD; 0 for no budget")
    parser.add_argument("--tpm", type=int32, help="tokens per minute; 0 for no limit")
    parser.add_argument("--rpm", type=int32, help="requests per minute; 0 for no limit")
    parser.add_argument("--metadata", action="append", type=pair, metavar="K=V", help="(repeat)")
    parser.add_argument(
        "--parallel", type=int32, help="max_parallel_requests: requests in flight; 0 for no limit"
    )
    parser.add_argument(
        "--model-limit",
        action="append",
        type=model_limit,
        metavar="MODEL=RPM:TPM",
        help="a per-model limit, e.g. gpt-4o=10:20000 (repeat; on update the list replaces "
        "every per-model limit the key had)",
    )
    shadow = parser.add_mutually_exclusive_group()
    shadow.add_argument(
        "--shadow",
        dest="enforce",
        action="store_false",
        default=None,
        help="shadow mode: count everything, deny nothing the key's own limits would deny",
    )
    shadow.add_argument("--enforce", dest="enforce", action="store_true", help="leave shadow mode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vkeys", description=__doc__, parents=[common_options(defaults=True)]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options(defaults=False)

    def command(
        name: str, run: Callable[[Api, argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(run=run, subparser=p)
        return p

    create = command("create", cmd_create, "create a key (the full key is printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--user-id", default="")
    create.add_argument("--team-id", default="")
    create.add_argument("--budget-duration", default="", help="<N>h, <N>d or 1mo")
    limit_options(create)

    ls = command("list", cmd_list, "list keys, oldest first")
    ls.add_argument("--user-id", default="", help="only this user's keys")
    ls.add_argument("--team-id", default="", help="only this team's keys")
    ls.add_argument("--status", default="", choices=["", "active", "revoked", "expired"])
    ls.add_argument("--page-size", type=int32, default=0, help="1..500 (default 50)")
    ls.add_argument("--page-token", default="")
    ls.add_argument("--all", action="store_true", help="follow every page")

    command("show", cmd_show, "show every field of a key").add_argument("key_id")

    update = command("update", cmd_update, "change only the given fields of a key")
    update.add_argument("key_id")
    update.add_argument("--name")
    update.add_argument("--budget-duration", help="<N>h, <N>d or 1mo; '' stops resets")
    update.add_argument("--clear-metadata", action="store_true", help="remove all metadata")
    update.add_argument(
        "--clear-model-limits", action="store_true", help="remove every per-model limit"
    )
    limit_options(update)

    command("revoke", cmd_revoke, "revoke a key").add_argument("key_id")

    rotate = command("rotate", cmd_rotate, "new secret for a key (printed once)")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-seconds", type=int32, default=0, help="old key keeps working")

    delete = command("delete", cmd_delete, "delete a key")
    delete.add_argument("key_id")
    delete.add_argument("--yes", "-y", action="store_true", help="accepted; never asks")

    validate = command("validate", cmd_validate, "check a full key (exit 1 when invalid)")
    validate.add_argument("key", nargs="?", help="the key; '-' or absent reads stdin")

    usage = command("usage", cmd_usage, "usage totals, a per-day chart and per-model table")
    usage.add_argument("key_id", nargs="?", help="one key's usage")
    usage.add_argument("--user-id", default="", help="every key the user ever had, instead")
    usage.add_argument("--team-id", default="", help="every key the team ever had, instead")
    usage.add_argument(
        "--days", type=int32, default=30, help="UTC days back, today included (default 30)"
    )
    usage.add_argument("--all-days", action="store_true", help="chart days without usage too")
    usage.add_argument("--csv", action="store_true", help="the rows (day, model) as CSV")

    export = command(
        "export", cmd_export, "every key's usage per day and model since a date, as CSV"
    )
    export.add_argument("--since", required=True, help="first UTC day, YYYY-MM-DD")
    export.add_argument("--until", default="", help="last UTC day, YYYY-MM-DD (default today)")
    export.add_argument("--user-id", default="", help="only this user's keys")
    export.add_argument("--team-id", default="", help="only this team's keys")

    budget_help = "user and team budgets: set, get, list, delete"
    budget = sub.add_parser("budget", help=budget_help, description=budget_help)
    budget.set_defaults(subparser=budget)
    actions = budget.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(
        name: str, run: Callable[[Api, argparse.Namespace], int], help_: str, *, one: bool = True
    ) -> argparse.ArgumentParser:
        p = actions.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(run=run, subparser=p)
        p.add_argument("scope", choices=SCOPES)
        if one:
            p.add_argument("id", help="the user_id or team_id that keys carry")
        return p

    put = action(
        "set",
        cmd_budget_set,
        "create a budget, or change the given fields of one (the others stay as they are)",
    )
    put.add_argument("--max-budget", type=float, help="USD; 0 for no budget")
    put.add_argument("--duration", help="<N>h, <N>d or 1mo: spent resets each period; '' never")
    put.add_argument("--rpm", type=int32, help="requests per minute; 0 for no limit")
    put.add_argument("--tpm", type=int32, help="tokens per minute; 0 for no limit")
    put.add_argument("--parallel", type=int32, help="requests in flight at once; 0 for no limit")
    action("get", cmd_budget_get, "show a budget: its limits, spend and requests in flight")
    action("list", cmd_budget_list, "list a scope's budgets, oldest first", one=False)
    delete_budget = action("delete", cmd_budget_delete, "delete a budget")
    delete_budget.add_argument("--yes", "-y", action="store_true", help="accepted; never asks")
    return parser


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said with the command's own usage, which lists the options it takes
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    addr = args.addr or os.environ.get("EXTAUTHZ_ADDR") or DEFAULT_ADDR
    token = args.token if args.token is not None else os.environ.get("EXTAUTHZ_ADMIN_TOKEN", "")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    if args.user:
        metadata.append(("x-user-id", args.user))
    try:
        with open_channel(addr, args.tls_ca, args.tls_cert, args.tls_key) as channel:
            try:
                code: int = args.run(Api(channel, tuple(metadata), args.timeout), args)
            except grpc.RpcError as err:
                return fail(explain(err, channel, addr))
            return code
    except (CliError, OSError) as err:
        return fail(str(err))
    except KeyboardInterrupt:
        return 130


def fail(message: str) -> int:
    print(f"vkeys: {message}", file=sys.stderr)
    return 1
