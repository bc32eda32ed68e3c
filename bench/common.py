"""Shared by the benchmarks (hook_latency.py, load.py): the request bodies and the service process.

* ``sign_body(n, seed, now)``: a deterministic, realistic ``order-sign`` request whose prefetch holds
  ``n`` resources (IV hydromorphone for a patient with migraine, so the opioid-in-migraine card fires).
* ``Service``: the service under gunicorn (``python -m cds_hooks_service serve``, i.e. gunicorn.conf.py)
  on a free loopback port with a throw-away SQLite store and instance directory and ``CDS_FIXED_NOW``;
  stopped with SIGTERM to the master (then SIGKILL).
* ``run_guarded(run, *args)``: a benchmark's main run, with SIGTERM turned into KeyboardInterrupt (so the
  service is stopped) and interruptions / service failures turned into an exit code.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cds_hooks_service.scenarios import (  # noqa: E402
    ENCOUNTER_ID, PATIENT_ID, USER_ID, expand_draft, expand_record, prefetch_for)

FIXED_NOW = "2026-03-01T12:00:00Z"
SIGN_SERVICE = "migraine-med-safety-sign"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# --------------------------------------------------------------------------------------------------
# Request bodies: a deterministic, realistic patient record (scenario shorthand, expanded to FHIR R4)
# --------------------------------------------------------------------------------------------------
# (code, display, status) — ICD-10-CM unless all digits (SNOMED CT). None of them is an exception
# of the opioid rule (no cancer/palliative care, no opioid use disorder).
CONDITIONS = [
    ("I10", "Essential (primary) hypertension", "active"),
    ("E11.9", "Type 2 diabetes mellitus without complications", "active"),
    ("E78.5", "Hyperlipidemia, unspecified", "active"),
    ("J45.909", "Unspecified asthma, uncomplicated", "active"),
    ("F41.1", "Generalized anxiety disorder", "active"),
    ("K21.9", "Gastro-esophageal reflux disease without esophagitis", "active"),
    ("G47.33", "Obstructive sleep apnea (adult) (pediatric)", "active"),
    ("F32.A", "Depression, unspecified", "active"),
    ("M54.50", "Low back pain, unspecified", "resolved"),
    ("N39.0", "Urinary tract infection, site not specified", "resolved"),
    ("J06.9", "Acute upper respiratory infection, unspecified", "resolved"),
    ("E66.9", "Obesity, unspecified", "active"),
    ("Z87.891", "Personal history of nicotine dependence", "active"),
    ("G43.009", "Migraine without aura, not intractable, without status migrainosus", "active"),
    ("38341003", "Hypertensive disorder, systemic arterial", "active"),
    ("37796009", "Migraine", "active"),
    ("44054006", "Diabetes mellitus type 2", "active"),
    ("195967001", "Asthma", "active"),
]
# MedicationRequest (RxNorm, display, status)
ORDERED = [
    ("313160", "sumatriptan 100 MG Oral Tablet", "active"),
    ("314076", "lisinopril 10 MG Oral Tablet", "active"),
    ("861007", "metformin hydrochloride 500 MG Oral Tablet", "active"),
    ("617310", "atorvastatin 20 MG Oral Tablet", "active"),
    ("197361", "amlodipine 5 MG Oral Tablet", "active"),
    ("312940", "sertraline 50 MG Oral Tablet", "active"),
    ("617993", "amoxicillin 875 MG / clavulanate 125 MG Oral Tablet", "completed"),
    ("85762", "ritonavir", "stopped"),
    ("1049621", "oxycodone hydrochloride 5 MG Oral Tablet", "completed"),
    ("310965", "ibuprofen 200 MG Oral Tablet", "completed"),
]
# MedicationAdministration (RxNorm ingredient, display, route)
GIVEN = [
    ("26225", "ondansetron 4 mg IV", "IV"),
    ("35827", "ketorolac 15 mg IV", "IV"),
    ("161", "acetaminophen 1000 mg PO", "PO"),
    ("3498", "diphenhydramine 25 mg IV", "IV"),
    ("6915", "metoclopramide 10 mg IV", "IV"),
    ("9863", "sodium chloride 0.9% 1000 mL IV", "IV"),
    ("7052", "morphine 4 mg IV", "IV"),
]
# MedicationStatement (RxNorm, display)
TAKING = [
    ("197696", "72 HR fentanyl 0.075 MG/HR Transdermal System"),
    ("313160", "sumatriptan 100 MG Oral Tablet"),
    ("8787", "propranolol"),
    ("38404", "topiramate"),
    ("5640", "ibuprofen"),
    ("11253", "vitamin D"),
]
# Other observations (LOINC, display, value sampler, unit)
LABS = [
    ("62238-1", "eGFR CKD-EPI", lambda r: round(r.gauss(88, 12)), "mL/min/{1.73_m2}"),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", lambda r: round(r.gauss(0.9, 0.15), 2), "mg/dL"),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", lambda r: round(r.gauss(4.1, 0.3), 1), "mmol/L"),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", lambda r: round(r.gauss(13.2, 1.0), 1), "g/dL"),
    ("8867-4", "Heart rate", lambda r: round(r.gauss(78, 10)), "/min"),
    ("29463-7", "Body weight", lambda r: round(r.gauss(74, 3), 1), "kg"),
]
PROCEDURES = [("80146002", "Appendectomy"), ("73761001", "Colonoscopy"), ("241615005", "MRI of brain")]

# share of the record per kind (the rest: conditions)
MIX = [("ordered", 0.16), ("given", 0.10), ("taking", 0.08), ("bp", 0.22), ("lab", 0.12), ("procedure", 0.02)]


def _ago(rng: random.Random, lo_days: float, hi_days: float) -> str:
    """A relative time between lo and hi days ago, in the shorthand (e.g. -412.5h)."""
    return f"-{round(rng.uniform(lo_days, hi_days) * 24, 1)}h"


def record_items(n_resources: int, seed: int) -> list[dict]:
    """Shorthand record items so that the prefetch holds ``n_resources`` resources (incl. the Patient)."""
    rng = random.Random(seed)
    n = max(n_resources - 1, 3)
    items: list[dict] = [
        {"condition": "G43.909", "display": "Migraine, unspecified, not intractable, without status migrainosus",
         "at": _ago(rng, 200, 900)},
        {"condition": "I10", "display": "Essential (primary) hypertension", "at": _ago(rng, 300, 1500)},
        {"bp": [142, 91], "at": "-40m"},  # triage vitals this visit
    ]
    counts = {kind: max(1, round(share * n)) for kind, share in MIX}
    counts["conditions"] = max(0, n - 2 - sum(counts.values()))  # 2 fixed conditions; the triage BP is in "bp"
    for _ in range(counts["conditions"]):
        code, display, status = rng.choice(CONDITIONS)
        items.append({"condition": code, "display": display, "status": status, "at": _ago(rng, 10, 3000)})
    for _ in range(counts["ordered"]):
        code, display, status = rng.choice(ORDERED)
        items.append({"ordered": code, "display": display, "text": display, "status": status, "route": "PO",
                      "at": _ago(rng, 1, 720)})
    for _ in range(counts["given"]):
        code, display, route = rng.choice(GIVEN)
        items.append({"given": code, "text": display, "route": route, "at": _ago(rng, 2, 900)})
    for _ in range(counts["taking"]):
        code, display = rng.choice(TAKING)
        items.append({"taking": code, "display": display, "text": display, "at": _ago(rng, 5, 720)})
    for _ in range(counts["bp"] - 1):
        items.append({"bp": [round(rng.gauss(132, 14)), round(rng.gauss(83, 9))], "at": _ago(rng, 1, 1500)})
    for _ in range(counts["lab"]):
        code, display, value, unit = rng.choice(LABS)
        items.append({"observation": code, "display": display, "value": value(rng), "unit": unit,
                      "at": _ago(rng, 1, 1500)})
    for _ in range(counts["procedure"]):
        code, display = rng.choice(PROCEDURES)
        items.append({"procedure": code, "display": display, "at": _ago(rng, 100, 4000)})
    items = items[:n]
    rng.shuffle(items)
    return items


def sign_body(n_resources: int, seed: int, now: datetime) -> dict:
    items = record_items(n_resources, seed)
    record = [expand_record(item, i, now) for i, item in enumerate(items)]
    draft = expand_draft({"drug": "897745", "text": "hydromorphone 2 MG/ML Injectable Solution, 1 mg IV once",
                          "route": "IV"}, 0, now)
    return {
        "hook": "order-sign",
        "hookInstance": f"bench-{n_resources}-{seed}",
        "context": {"userId": USER_ID, "patientId": PATIENT_ID, "encounterId": ENCOUNTER_ID,
                    "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                    "entry": [{"resource": draft}]}},
        "prefetch": prefetch_for(record),
    }


def _template_codes() -> set[str]:
    """The observation codes of the discovery templates, which are generated from the shipped rules."""
    from cds_hooks_service.config import Settings  # noqa: E402
    from cds_hooks_service.rulebook import load_rulebook  # noqa: E402

    settings = Settings()
    prefetch = load_rulebook(settings.rules_dir, settings.cards_dir).prefetch
    query = prefetch["observations"].split("code=")[1].split("&")[0]
    return {c.split("|")[-1] for c in query.split(",")}


def template_sign_body(n_resources: int, seed: int, now: datetime) -> dict:
    """Like :func:`sign_body`, but the prefetch holds what the discovery templates ask for: every condition and
    medication, the newest 100 observations with the templates' codes (BP, eGFR, hCG) and the newest 100
    procedures (``_sort=-date&_count=100``); about ``n_resources`` resources in all."""
    codes = _template_codes()
    body = None
    for n in range(n_resources, 4 * n_resources, max(1, n_resources // 20)):
        items = record_items(n, seed)
        record = [expand_record(item, i, now) for i, item in enumerate(items)]
        obs = sorted((r for r in record if r["resourceType"] == "Observation"
                      and r["code"]["coding"][0]["code"] in codes), key=lambda r: r["effectiveDateTime"], reverse=True)
        procs = sorted((r for r in record if r["resourceType"] == "Procedure"),
                       key=lambda r: r["performedDateTime"], reverse=True)
        kept = [r for r in record if r["resourceType"] not in ("Observation", "Procedure")] + obs[:100] + procs[:100]
        body = sign_body(1, seed, now)
        body["prefetch"] = prefetch_for(kept)
        body["hookInstance"] = f"bench-template-{n_resources}-{seed}"
        if count_resources(body) >= n_resources:
            break
    return body


def dhe_body(n_resources: int, seed: int, now: datetime, *, drafts: int = 1, triptans: int = 20) -> dict:
    """An ``order-sign`` with ``drafts`` DHE orders for a patient who was given ``triptans`` sumatriptan doses
    (the last one 2 h ago: the DHE/triptan 24 h conflict) on top of a ``n_resources`` record."""
    items = record_items(n_resources, seed) + [
        {"given": "37418", "text": "sumatriptan 6 mg SC", "route": "SC", "at": f"-{2 + i % 200}h"}
        for i in range(triptans)]
    record = [expand_record(item, i, now) for i, item in enumerate(items)]
    dhe = [expand_draft({"id": f"dhe-{i}", "drug": "3418", "text": "dihydroergotamine 1 mg IV", "route": "IV"}, i, now)
           for i in range(drafts)]
    return {
        "hook": "order-sign",
        "hookInstance": f"bench-dhe-{n_resources}-{drafts}-{triptans}",
        "context": {"userId": USER_ID, "patientId": PATIENT_ID, "encounterId": ENCOUNTER_ID,
                    "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                    "entry": [{"resource": d} for d in dhe]}},
        "prefetch": prefetch_for(record),
    }


def count_resources(body: dict) -> int:
    n = 0
    for value in body["prefetch"].values():
        n += len(value.get("entry") or []) if value.get("resourceType") == "Bundle" else 1
    return n


# --------------------------------------------------------------------------------------------------
# Service process
# --------------------------------------------------------------------------------------------------
class ServiceFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The service under gunicorn in a subprocess; stopped in ``stop()`` (SIGTERM to the master, then SIGKILL).

    ``workers``: passed as ``serve --workers`` (None: gunicorn.conf.py decides, i.e. WEB_CONCURRENCY or 2).
    ``env``: extra environment for the service (e.g. WEB_CONCURRENCY, GUNICORN_THREADS); ``drop_env``:
    variables of this process's environment not to pass on. The gunicorn master is ``proc.pid``.
    """

    def __init__(self, workers: int | None, env: dict[str, str] | None = None, drop_env: tuple[str, ...] = ()):
        self.workers = workers
        self.extra_env = dict(env or {})
        self.drop_env = tuple(drop_env)
        self.tmp = tempfile.TemporaryDirectory(prefix="cds-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(self.tmp.name) / "service.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CDS_JWT_ISSUERS", "GUNICORN_CMD_ARGS", "CDS_DEBUG_TRACE", "PORT", "HOST")
               and k not in self.drop_env}
        env.update(CDS_FIXED_NOW=FIXED_NOW, CDS_INSTANCE_DIR=self.tmp.name,
                   DATABASE_URL=f"sqlite:///{self.tmp.name}/bench.sqlite3", PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "cds_hooks_service", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # Ctrl-C reaches only the bench, which then stops the service itself
        log.close()
        self._wait_healthy("the service", timeout)

    def _wait_healthy(self, what: str, timeout: float) -> None:
        """Until GET /healthz answers 200; ServiceFailure with the log's tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceFailure(f"{what} exited with code {self.proc.returncode} while starting:\n"
                                     + self.log_tail())
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise ServiceFailure(f"{what}: /healthz did not answer 200 within {timeout:.0f} s:\n" + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no service log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # gunicorn master: graceful shutdown of its workers
            try:
                self.proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        self.tmp.cleanup()


# The worker class the service runs (gunicorn.conf.py reads the same variable; the production default is the
# service's gevent worker): the bare Flask floor runs under the same class, so F and A differ only by the app.
SERVICE_WORKER_CLASS = os.environ.get("GUNICORN_WORKER_CLASS", "cds_hooks_service.gevent_worker.GeventWorker")


class BareFlask(Service):
    """bench/bare_flask.py under gunicorn with the service's worker settings (its worker class, keep-alive 15 s)."""

    def __init__(self, workers: int = 1, threads: int = 4, worker_class: str = SERVICE_WORKER_CLASS):
        super().__init__(workers)
        self.threads = threads
        self.worker_class = worker_class

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("GUNICORN_CMD_ARGS", "PORT", "HOST")}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO_ROOT / 'bench'}:{REPO_ROOT}")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--worker-class", self.worker_class, "--threads", str(self.threads),
             "--workers", str(self.workers), "--keep-alive", "15", "--bind", f"127.0.0.1:{self.port}",
             "bare_flask:app"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        self._wait_healthy("the bare Flask app", timeout)


def worker_pids(master: int) -> list[int]:
    """The gunicorn master's worker processes (from /proc/<master>/task/*/children)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{master}/task").glob("*"):
        try:
            kids.update(int(x) for x in (task / "children").read_text().split())
        except (OSError, ValueError):
            pass
    return sorted(k for k in kids if Path(f"/proc/{k}").exists())


def cpu_ns(pids: list[int]) -> int:
    """CPU time (ns) used so far by all threads of these processes (/proc/<pid>/task/*/schedstat): the time
    they ran on a CPU, which the other processes of a loaded machine do not inflate as they do wall time."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def run_guarded(run, *args):
    """``run(*args)`` with SIGTERM (and SIGINT, when a shell started the bench with it ignored) raising
    KeyboardInterrupt, so that ``run`` stops its service on the way out.

    Returns ``(result, None)``, or ``(None, exit code)`` after saying why on stderr: 130 when interrupted,
    1 on a ServiceFailure or a request error.
    """
    def _interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)  # stop the service on SIGTERM too
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. started in the background by a shell
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return run(*args), None
    except KeyboardInterrupt:
        print("interrupted; the service was stopped", file=sys.stderr)
        return None, 130
    except ServiceFailure as exc:
        print(f"service failure: {exc}", file=sys.stderr)
        return None, 1
    except requests.RequestException as exc:
        print(f"service failure: request error: {exc}", file=sys.stderr)
        return None, 1
