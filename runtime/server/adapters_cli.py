"""`quiver adapters list|load|unload --server HOST:PORT`: manage a running server's adapters.

A server started with --admin-token wants that token: `--token T` or env QUIVER_TOKEN."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("adapters", help="list, load or unload the adapters of a running server")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="adapters the server holds")
    load = verbs.add_parser("load", help="load (or reload) an adapter")
    load.add_argument("adapter_id")
    load.add_argument("--source", default="",
                      help="PEFT directory on the server: absolute, or relative to its --adapter-dir "
                           "(default: <adapter-dir>/<adapter_id>)")
    unload = verbs.add_parser("unload", help="unload an adapter (in-flight requests finish first)")
    unload.add_argument("adapter_id")
    from runtime.server.client_options import add_connection_options

    for v in (ls, load, unload):
        v.add_argument("--server", required=True, help="HOST:PORT of a running `quiver serve`")
        v.add_argument("--json", action="store_true", help="JSON output")
        add_connection_options(v)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from runtime.server.client import client_from_args, rpc_error_message

    with client_from_args(args, timeout=300) as q:
        try:
            if args.verb == "list":
                result = [MessageToDict(a, preserving_proto_field_name=True) for a in q.list_adapters()]
            elif args.verb == "load":
                result = MessageToDict(q.load_adapter(args.adapter_id, args.source),
                                       preserving_proto_field_name=True)
            else:
                result = MessageToDict(q.unload_adapter(args.adapter_id), preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
        except grpc.RpcError as e:
            print(f"quiver adapters {args.verb}: error: {rpc_error_message(e)}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(args.verb, result)
    return 0


def _print_human(verb: str, result) -> None:
    if verb == "unload":
        print("unloaded" if result["unloaded"] else
              f"unloading: {result['in_flight']} requests in flight finish first")
        return
    rows = result if verb == "list" else [result]
    print(f"{'ID':30} {'TYPE':22} {'RANK':>4} {'VTOK':>4} {'STATE':24} {'SERVED':>7}  TARGETS")
    for a in rows:
        print(f"{a['adapter_id']:30} {a.get('type', '-'):22} {a.get('rank', 0):>4} "
              f"{a.get('num_virtual_tokens', 0):>4} {a.get('state', '-'):24} "
              f"{a.get('requests_served', '0'):>7}  {','.join(a.get('target_modules', []))}")
