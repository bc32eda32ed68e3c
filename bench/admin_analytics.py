"""Time the /admin views over a large synthetic feedback store (SQLite file, or PostgreSQL with --database-url).

    python bench/admin_analytics.py [--cards 1000000] [--database-url postgresql://...]

Fills an empty store with N cards issued evenly over the year before 2026-03-01 12:00 UTC in time order (as a
service writes them), six rules, every sixth card a shadow card, 30 % of the active cards answered (20 %
overridden, 10 % accepted), then requests each view three times through the Flask app (no HTTP server) and
prints the best and all wall-clock times. The database is filled by SQL (a recursive CTE / generate_series).
A PostgreSQL database must be empty and is left filled; the SQLite file is thrown away.
"""
from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cds_hooks_service import create_app  # noqa: E402
from cds_hooks_service.config import Settings  # noqa: E402
from cds_hooks_service.facts import parse_time  # noqa: E402
from cds_hooks_service.store import FeedbackStore  # noqa: E402

NOW = "2026-03-01T12:00:00Z"
YEAR_S = 365 * 24 * 3600
TOKEN = "bench-admin-token-0123456789abcdef0123"
VIEWS = ["/admin", "/admin?days=365", "/admin/rules/opioid-in-migraine/overrides",
         "/admin/rules/opioid-in-migraine/overrides?days=365&page=100", "/admin/rules.csv?days=365",
         "/admin/overrides.csv?rule=opioid-in-migraine"]
RULE_OF = ("CASE {i} % 6 WHEN 0 THEN 'opioid-in-migraine' WHEN 1 THEN 'dhe-cyp3a4-inhibitor' "
           "WHEN 2 THEN 'dhe-triptan-ergot-24h' WHEN 3 THEN 'dhe-vasopressor' "
           "WHEN 4 THEN 'dhe-contraindicated-condition' ELSE 'ketamine-non-refractory-migraine' END")


# The columns filled (client_id: its server default, the open-mode client), named: the table gains columns.
_CARD_COLUMNS = ("INSERT INTO cds_issued_card (card_uuid, rule_id, service_id, hook_instance, indicator, mode, "
                 "suppression_key, issued_at)")


def fill(store: FeedbackStore, n: int) -> None:
    pg = store.dialect == "postgresql"
    mod = (lambda a, b: f"mod({a}, {b})") if pg else (lambda a, b: f"({a}) % {b}")
    i = "i"
    rule = RULE_OF.replace("{i} % 6", mod(i, 6))
    common = (f"{rule}, CASE {mod(i, 2)} WHEN 0 THEN 'migraine-med-safety-sign' ELSE 'migraine-med-safety-select' END, "
              f"'h', 'warning', CASE {mod(i, 6)} WHEN 5 THEN 'shadow' ELSE 'active' END")
    if pg:
        cards = (f"{_CARD_COLUMNS} SELECT 'c' || lpad(i::text, 9, '0'), {common}, 'k' || i, "
                 f"timestamptz '{NOW}' - (({n - 1} - i)::bigint * {YEAR_S} / {n}) * interval '1 second' "
                 f"FROM generate_series(0, {n - 1}) i")
        num = "substr(card_uuid, 2)::bigint"
    else:
        cards = (f"WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {n - 1}) "
                 f"{_CARD_COLUMNS} SELECT printf('c%09d', i), {common}, 'k' || i, "
                 f"strftime('%Y-%m-%d %H:%M:%f', '2026-03-01 12:00:00', printf('-%d seconds', (({n - 1} - i) * {YEAR_S}) / {n})) "
                 f"FROM s")
        num = "CAST(substr(card_uuid, 2) AS INTEGER)"
    answers = (f"INSERT INTO cds_feedback (card_uuid, service_id, rule_id, outcome, override_system, override_code, "
               f"override_display, has_comment, accepted_suggestions, outcome_timestamp, received_at) "
               f"SELECT card_uuid, service_id, rule_id, CASE WHEN {mod(num, 10)} < 2 THEN 'overridden' ELSE 'accepted' END, "
               f"'https://example.org/reasons', 'r' || {mod(num, 7)}, 'Reason', {'true' if pg else '1'}, '[]', issued_at, issued_at "
               f"FROM cds_issued_card WHERE mode = 'active' AND {mod(num, 10)} < 3")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(cards.replace("%", "%%") if pg else cards)
        conn.exec_driver_sql(answers.replace("%", "%%") if pg else answers)
        if pg:
            conn.exec_driver_sql("ANALYZE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=1_000_000)
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: a throw-away SQLite file)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-admin-"))
    url = args.database_url or f"sqlite:///{tmp / 'store.sqlite3'}"
    store = FeedbackStore(url)
    started = time.perf_counter()
    fill(store, args.cards)
    print(f"{store.dialect}: {args.cards} cards filled in {time.perf_counter() - started:.1f} s")
    settings = Settings(database_url=url, instance_dir=tmp, suppression_secret=b"bench",
                        fixed_now=parse_time(NOW), admin_token=TOKEN, listen_hosts=("127.0.0.1",))
    client = create_app(settings, store=store).test_client()
    headers = {"Authorization": "Basic " + base64.b64encode(f"bench:{TOKEN}".encode()).decode()}
    for path in VIEWS:
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            response = client.get(path, headers=headers)
            size = len(response.get_data())
            times.append(time.perf_counter() - t)
        print(f"{path:62s} {response.status_code} {size:>9d} B  best {min(times) * 1000:7.0f} ms  "
              f"(runs: {', '.join(f'{x * 1000:.0f}' for x in times)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
