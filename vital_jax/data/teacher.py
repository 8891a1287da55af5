"""Teacher distillation (App. A.2-A.3): questions -> gated (answer, K-step reasoning chain) records.

Pieces, in the order a sample meets them:
  render_overlay     the teacher-only view: mask in red at alpha 0.4, boundary in yellow (App. A.2)
  SYSTEM_PROMPT      role, teacher-only information, leakage prevention, image-grounded reasoning, modality
                     vocabulary and separate regions, image-space spatial convention (thirds; halves by the
                     midline), grammar, strict JSON; `user_prompt` adds the target, question, the type's step
                     range and an in-context JSON example
  ChatClient         OpenAI-compatible chat-completions over urllib: API key read from the environment variable
                     the config names (never logged or written), retries with exponential back-off on HTTP 5xx,
                     429 and timeouts; redirects refused (urllib would send the key to the new host), and
                     credentials in base_url (userinfo, query) never written (`redact_url`)
  ApiTeacher         overlay + prompts + client; `GeometryTeacher` (geometry_teacher.py) has the same interface
  distill            bounded thread pool; every output through the quality gate, up to 4 regenerations whose
                     prompt names the violation; accepted records appended one per line (resumable: a rerun skips
                     finished ids; Ctrl-C waits for the answers in flight and records them, a crash loses at most
                     those); rejections logged with reasons to JSONL; summary statistics (accept rate per gate
                     round, retries, per question type); a missing or refused API key stops the run at once.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import http.client
import io
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Protocol, Sequence

import numpy as np
from absl import logging
from PIL import Image
from scipy import ndimage

from vital_jax.data import geometry, ingest, quality_gate, records
from vital_jax.data.geometry_teacher import GeometryTeacher, mask_verdict
from vital_jax.data.questions import CLOSED_TYPES, Question
from vital_jax.data.records import STEP_RANGES
from vital_jax.jsonio import atomic_write

OVERLAY_COLOR = (255, 0, 0)
CONTOUR_COLOR = (255, 255, 0)
OVERLAY_ALPHA = 0.4
MAX_REGENERATIONS = 4
REJECTED_FILE = "rejected.jsonl"
SUMMARY_FILE = "distill_summary.json"


# ------------------------------------------------------------------------------------------ teacher-only view
def render_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 (H, W, 3): `mask` (bool (H, W)) blended in red at `alpha` over `image` (uint8 (H, W, 3)), with the
    mask's boundary (pixels with a background 8-neighbour; thicker on large images) drawn in yellow."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    out = image.astype(np.float64).copy()
    out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(OVERLAY_COLOR, np.float64)
    side = 2 * max(1, max(mask.shape) // 512) + 1
    boundary = mask & ~ndimage.binary_erosion(mask, np.ones((side, side), bool))  # beyond the image: background
    out[boundary] = CONTOUR_COLOR
    return np.round(out).astype(np.uint8)


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------------- prompts
SYSTEM_PROMPT = """\
You are a teacher that writes training data for a medical visual reasoning model. For each image and question you \
write a short final answer and a reasoning chain of a given number of steps; each step is one or two sentences \
that the student model will learn to reason through.

Teacher-only information. You receive the image with the target region tinted and bordered, and the name and \
type of the target. Use them only to find the right structure. Your output must read as if it were written by \
someone who sees only the original, unmarked image and was never told what the target is.

Never mention or imply any guidance: do not refer to masks, overlays, tints or colours added to the image, \
borders, contours, outlines, highlighted or marked areas, segmentation, annotations, labels, regions of interest, \
ground truth, metadata, or to the target having been provided.

Ground every statement in visible evidence: location, shape, margin, extent, density or signal intensity or \
echogenicity, texture, and relation to nearby structures. You may name the target itself, but do not add a \
diagnosis, malignancy or benignity, severity, prognosis or treatment that the image does not show. For normal \
anatomy, describe normal appearance only.

Contrast words belong to the imaging modality: attenuation (hyperdense, hypodense) on CT; opacity for brighter \
(more attenuating) and lucency for darker on X-ray; signal intensity (hyperintense, hypointense) on MRI; \
echogenicity (hyperechoic, hypoechoic, anechoic) on ultrasound; staining on pathology. Never use a word that \
contradicts the target's own name (a lung opacity is not lucent). A target made of several separate regions \
(both lungs, scattered cells) is described as what it is, with where each region lies, never as one shape at \
their common centre.

Spatial convention: describe positions in image space only: the left, right, upper, lower or central part of \
the image, each the third of the image width or height that holds the structure. Say "half" only when the \
question asks about a half, and then by the image's midline. Never use patient-space or radiological wording \
such as patient's left, patient's right, anatomical left or anatomical right.

Write grammatical English: "an" before a vowel sound, plural nouns after counts, verbs that agree with their \
subjects.

Output strict JSON: one object with exactly two fields, "final_answer" (a string) and "reasoning_chain" (a list \
of strings, one per step). No Markdown, no code fences, no text before or after the object."""

_TYPE_GUIDANCE = {
    "yes_no": "Simple visual confirmation. Give the direct visual evidence for the answer. The final answer "
              "starts with Yes or No and is a complete sentence.",
    "identify": "Identification. Justify the recognised structure by its visible appearance and its anatomical "
                "context. The final answer is a complete sentence naming it.",
    "location_choice": "Coarse spatial choice. State where the structure lies. The final answer is a complete "
                       "sentence, not a bare word such as left, right or center.",
    "location": "Spatial localisation. First identify the structure, then describe its image-space position "
                "relative to the surrounding anatomy.",
    "describe": "Description. Cover the structure's appearance, shape, margin, extent and other visible "
                "characteristics.",
    "reasoning": "Visual interpretation. Analyse the structure's location, morphology, visual contrast and its "
                 "relation to nearby structures.",
}
_EXAMPLES = {
    "yes_no": {"final_answer": "Yes, the spleen is visible in the upper right part of the image.",
               "reasoning_chain": ["A crescent-shaped soft-tissue structure lies along the upper right part of the "
                                   "image, with uniform density typical of the spleen."]},
    "identify": {"final_answer": "The organ shown is the kidney.",
                 "reasoning_chain": ["A bean-shaped structure in the lower left part of the image, with a bright "
                                     "outer cortex and a central hilum, matches a kidney."]},
    "location_choice": {"final_answer": "The liver is in the left part of the image.",
                        "reasoning_chain": ["The large homogeneous organ occupies most of the left part of the "
                                            "image, extending from the upper edge toward the middle."]},
    "location": {"final_answer": "The gallbladder is located in the central part of the image, just below the "
                                 "liver.",
                 "reasoning_chain": ["A small oval fluid-density structure is seen beneath the liver.",
                                     "It lies in the central part of the image, below the liver and to the left of "
                                     "the stomach."]},
    "describe": {"final_answer": "The pancreas appears as an elongated, lobulated soft-tissue structure of uniform "
                                 "density crossing the middle of the image.",
                 "reasoning_chain": ["An elongated soft-tissue structure crosses the middle of the image "
                                     "horizontally.",
                                     "Its margin is finely lobulated and its density is uniform, slightly lower "
                                     "than the liver."]},
    "reasoning": {"final_answer": "The rounded low-density focus within the liver, with a well-defined margin, is "
                                  "consistent with the tumor.",
                  "reasoning_chain": ["Within the liver, in the upper left part of the image, there is a rounded "
                                      "focus.",
                                      "It measures a small fraction of the liver and has a well-defined margin.",
                                      "Its density is clearly lower than the surrounding liver tissue.",
                                      "It is enclosed by liver tissue and does not reach the liver surface."]},
}


def user_prompt(question: Question) -> str:
    """The per-sample prompt: hidden target identity and type, question type, the student-visible question, and
    the question-type guidance block (step range + in-context JSON example)."""
    low, high = STEP_RANGES[question.question_type]
    steps = f"exactly {low} reasoning step{'s' if low > 1 else ''}" if low == high else (
        f"{low} to {high} reasoning steps (aim for {question.latent_steps})")
    lines = [f"Target (teacher-only, do not reveal that it was given): {question.target}",
             f"Target type: {question.target_type}",
             f"Imaging modality: {question.modality}",
             f"Question type: {question.question_type}",
             f"Student question: {question.question}"]
    if question.choices:
        lines.append(f"Choices: {', '.join(question.choices)}")
    if question.normal_anatomy:
        lines.append("This target is normal anatomy: describe normal appearance only, no pathology words.")
    if question.template == "yes_no_absent":
        organ = question.slots["organ"]
        lines.append(f"The marked region is the {organ}, where a {question.target} would be; this image shows no "
                     f"{question.target}: the answer is no, reasoned from the {organ}'s appearance.")
    lines += ["", f"Guidance for {question.question_type} questions: {_TYPE_GUIDANCE[question.question_type]}",
              f"Required reasoning steps: {steps}.",
              "Example of the output format (a different case):",
              json.dumps(_EXAMPLES[question.question_type], ensure_ascii=False)]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- client
class TeacherTransportError(RuntimeError):
    """The teacher could not be reached or answered with an error after all retries."""


class TeacherStopError(TeacherTransportError):
    """No further question can be asked: `distill` records the answers in flight and stops."""


class TeacherAuthError(TeacherStopError):
    """No API key, or the endpoint refused it (HTTP 401 / 403): no question can be answered, so `distill` stops
    at the first one instead of failing every question in turn."""


class TeacherBudgetError(TeacherStopError):
    """`ApiConfig.max_requests` requests were sent: the run stops; a rerun with a larger budget goes on."""


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """An OpenAI-compatible endpoint. `api_key_env` is the NAME of the environment variable holding the key
    ("" for an endpoint without authentication); the key itself is never stored in a config."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 2.0
    temperature: float | None = 0.2
    max_tokens: int | None = None
    max_requests: int = 0  # HTTP requests this client may send (retries included); 0 = no limit


def redact_url(url: str) -> str:
    """`url` as messages, logs and rejected.jsonl may show it: userinfo, query and fragment replaced by *** (a
    user may have put credentials there: https://user:key@host/v1, ?key=...); anything that is not a URL with a
    host is not shown at all."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<not a URL>"
    if not parts.scheme or not parts.netloc:
        return "<not a URL>"
    userinfo, at, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit((parts.scheme, f"***@{host}" if at else host, parts.path,
                                    "***" if parts.query else "", "***" if parts.fragment else ""))


def _without_url_secrets(text: str, url: str) -> str:
    """`text` (an exception's) with the parts of `url` that may be credentials replaced by ***: http.client quotes
    them (`nonnumeric port: 'key@host'` for https://user:key@host)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return text
    userinfo = parts.netloc.rpartition("@")[0]
    secrets = {userinfo, *userinfo.split(":", 1), parts.query, parts.fragment} - {""}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _host(url: str, location: str) -> str:
    """The host (and port) a redirect from `url` to `location` (absolute or relative) points at, no userinfo."""
    try:
        return urllib.parse.urlsplit(urllib.parse.urljoin(url, location)).netloc.rpartition("@")[2]
    except ValueError:
        return "<an unparseable Location>"


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib copies the Authorization header to the new URL, which may be another host.
    Without a new request the 3xx response reaches the caller as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ChatClient:
    """POST {base_url}/chat/completions with urllib; returns the first choice's message content. A redirect is an
    error, not followed; base_url appears in messages only through `redact_url`."""

    def __init__(self, config: ApiConfig, sleep: Callable[[float], None] = time.sleep,
                 jitter: Callable[[], float] = random.random):
        self.config = config
        self._sleep = sleep
        self._jitter = jitter  # in [0, 1): up to 25 % more wait, so the workers' retries do not land together
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        self.retries = 0  # transport retries so far (all threads; an int += is atomic enough for a statistic)
        self._lock = threading.Lock()
        # Sent requests and the tokens the endpoint reported using (its "usage"), what the run costs.
        self.usage = collections.Counter()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise TeacherAuthError(f"environment variable {self.config.api_key_env} is not set "
                                       "(it must hold the teacher API key)")
            if not key.isprintable() or key != key.strip():  # http.client's error would quote the whole header
                raise TeacherAuthError(f"environment variable {self.config.api_key_env}: the teacher API key "
                                            "holds whitespace or control characters (a pasted newline?)")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _count_tokens(self, payload) -> None:
        with self._lock:
            self.usage.update(_usage_tokens(payload))

    def complete(self, messages: list[dict]) -> str:
        body = {"model": self.config.model, "messages": messages}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        data = json.dumps(body).encode("utf-8")
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        shown = redact_url(url)
        last_error, asked_wait = "", 0.0
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.retries += 1
                backoff = self.config.backoff_s * 2 ** (attempt - 1) * (1 + 0.25 * self._jitter())
                self._sleep(max(backoff, asked_wait))
                asked_wait = 0.0  # what the last reply asked for, not an earlier one
            try:
                request = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
            except ValueError as e:  # its message quotes the whole URL
                raise TeacherTransportError(f"base_url {shown}: not an http(s) URL") from e
            with self._lock:
                if self.config.max_requests and self.usage["requests"] >= self.config.max_requests:
                    raise TeacherBudgetError(f"{shown}: the budget of {self.config.max_requests} requests "
                                             "(teacher.max_requests) is spent; rerun with a larger one to go on")
                self.usage["requests"] += 1
            try:
                with self._opener.open(request, timeout=self.config.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                self._count_tokens(payload)
                return _message_content(payload)
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code} {e.reason}"
                asked_wait = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                if 300 <= e.code < 400 and e.headers.get("Location"):
                    raise TeacherTransportError(
                        f"{shown}: {last_error}, a redirect to host {_host(url, e.headers['Location'])!r}; not "
                        "followed (it would carry the API key there): set base_url to the endpoint itself") from e
                if e.code in (401, 403):
                    raise TeacherAuthError(f"{shown}: {last_error}: the API key was refused (not retried)") from e
                if e.code < 500 and e.code != 429:
                    raise TeacherTransportError(f"{shown}: {last_error} (not retried)") from e
            except (urllib.error.URLError, TimeoutError, socket.timeout, http.client.HTTPException,
                    ConnectionError) as e:
                last_error = _without_url_secrets(f"{type(e).__name__}: {getattr(e, 'reason', e)}", url)
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                last_error = f"malformed API response ({e})"
        raise TeacherTransportError(f"{shown}: failed after {self.config.max_retries + 1} attempts ({last_error})")


def _usage_tokens(payload) -> dict[str, int]:
    """{"prompt_tokens": n, "completion_tokens": m} of an OpenAI-style reply's "usage" (what it holds of them)."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return {}
    return {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}


def _retry_after(value: str | None) -> float:
    """Seconds a 429 / 503 reply's Retry-After header asks for (its delay-seconds form, at most 10 minutes); 0
    when it asks nothing or gives an HTTP date."""
    try:
        return min(max(float(value), 0.0), 600.0) if value else 0.0
    except ValueError:
        return 0.0


def _message_content(payload) -> str:
    """The reply's text. A well-formed reply without text content (a refusal: content null beside "refusal"; an
    empty reply) comes back as whatever text it has, for the gate to reject: it was answered and paid for, and
    retrying it as a transport failure asked it up to max_retries + 1 times, then again on every rerun. Content
    given as a list of parts is joined. Only a payload without choices[0].message is malformed (ValueError)."""
    try:
        message = payload["choices"][0]["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError("no choices[0].message") from e
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    refusal = message.get("refusal")
    return refusal if isinstance(refusal, str) else ""


class Teacher(Protocol):
    """Anything that answers a question as teacher JSON text; `feedback` is the retry block, None at first."""

    name: str

    def generate(self, question: Question, image: np.ndarray, mask: np.ndarray, feedback: str | None = None) -> str:
        ...


class ApiTeacher:
    """A proprietary MLLM behind an OpenAI-compatible API, shown the teacher-only overlay."""

    name = "api"

    def __init__(self, client: ChatClient):
        self.client = client

    def generate(self, question: Question, image: np.ndarray, mask: np.ndarray, feedback: str | None = None) -> str:
        text = user_prompt(question) + (f"\n\n{feedback}" if feedback else "")
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": [
                        {"type": "text", "text": text},
                        {"type": "image_url", "image_url": {"url": png_data_url(render_overlay(image, mask))}}]}]
        return self.client.complete(messages)


# ------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class DistillStats:
    """Counts over one `distill` run (skipped samples excluded from everything but `skipped`)."""

    questions: int = 0
    skipped: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0                     # transport or input errors: not finished, retried by the next run
    attempts: int = 0
    regenerations: int = 0
    first_attempt_accepted: int = 0
    round_reached: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    round_failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    per_type: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    transport_retries: int = 0

    def summary(self) -> dict:
        """JSON-ready statistics, including the pass rate of each gate round over all attempts that reached it."""
        rounds = {}
        for name in quality_gate.ROUNDS:
            reached, failed = self.round_reached[name], self.round_failed[name]
            rounds[name] = {"reached": reached, "failed": failed,
                            "pass_rate": None if reached == 0 else round((reached - failed) / reached, 4)}
        done = self.accepted + self.rejected
        return {"questions": self.questions, "skipped_finished": self.skipped, "accepted": self.accepted,
                "rejected": self.rejected, "failed_unfinished": self.failed, "attempts": self.attempts,
                "regenerations": self.regenerations, "transport_retries": self.transport_retries,
                "accept_rate": None if done == 0 else round(self.accepted / done, 4),
                "first_attempt_accept_rate": None if done == 0 else round(self.first_attempt_accepted / done, 4),
                "gate_rounds": rounds, "per_question_type": {k: dict(v) for k, v in sorted(self.per_type.items())}}


@dataclasses.dataclass
class _Outcome:
    question: Question
    record: records.Record | None
    results: list          # GateResult per attempt
    error: str | None = None
    outputs: list = dataclasses.field(default_factory=list)  # each attempt's raw teacher text (paid for)


def _gate_context(q: Question, image: np.ndarray, mask: np.ndarray, teacher=None) -> quality_gate.GateContext:
    """The gate's view of `q`, with the closed answer its mask decides (the ground_truth round). A teacher that
    measures the mask itself (the geometry teacher, with its cache) lends the gate its measurement: not done twice."""
    expected = None
    if q.question_type in CLOSED_TYPES:
        measured = (teacher.measure(q, image, mask) if hasattr(teacher, "measure")
                    else geometry.measure(image, mask))
        expected = mask_verdict(q, measured)
    return quality_gate.GateContext(question_type=q.question_type, target=q.target, target_type=q.target_type,
                                    normal_anatomy=q.normal_anatomy, choices=q.choices, modality=q.modality,
                                    expected_answer=expected)


class _InputCache:
    """The last few decoded (image, mask) pairs: consecutive questions usually ask about the same target."""

    def __init__(self, data_dir: str, size: int):
        self.data_dir, self.size = data_dir, size
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def load(self, question: Question) -> tuple[np.ndarray, np.ndarray]:
        key = (question.image, question.mask)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        image = ingest.load_rgb(os.path.join(self.data_dir, question.image))
        mask = ingest.load_mask(os.path.join(self.data_dir, question.mask), image.shape[:2])
        with self._lock:
            self._items[key] = (image, mask)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return image, mask


def _answer_one(teacher: Teacher, question: Question, inputs: _InputCache, max_regenerations: int) -> _Outcome:
    try:
        image, mask = inputs.load(question)
    except ingest.IngestError as e:
        return _Outcome(question, None, [], error=f"input: {e}")
    context, results, outputs, feedback = _gate_context(question, image, mask, teacher), [], [], None
    for attempt in range(max_regenerations + 1):
        try:
            raw = teacher.generate(question, image, mask, feedback)
        except TeacherStopError:
            raise  # no key, a refused key, a spent budget: every question would fail alike, `distill` stops
        except TeacherTransportError as e:
            return _Outcome(question, None, results, error=f"transport: {e}", outputs=outputs)
        result = quality_gate.check(raw, context)
        results.append(result)
        outputs.append(raw)
        if result.accepted:
            out = result.output
            return _Outcome(question, question.to_record(out.final_answer, out.reasoning_chain), results)
        feedback = quality_gate.retry_prompt(result, attempt + 1)
    return _Outcome(question, None, results, outputs=outputs)


def _recover_jsonl(path: str) -> None:
    """Make the file whole lines again: a last line without its newline that is whole JSON (a hand edit, another
    tool) gets the newline; one that is not (a crash mid-append) is dropped, and its sample is redone."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:].decode("utf-8"))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError: torn mid-line
            logging.warning("%s: dropping a torn last line of %d bytes (an interrupted write)", path,
                            len(data) - keep)
            f.truncate(keep)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")


def _finished_ids(records_path: str, rejected_path: str) -> set[str]:
    """Ids accepted in records.jsonl or finally rejected in the rejection log; RecordError naming the file and
    line for a line of either that cannot be read."""
    done = {r.id for r in records.read_records(records_path)} if os.path.exists(records_path) else set()
    if os.path.exists(rejected_path):
        for number, entry in records.iter_jsonl(rejected_path):
            if isinstance(entry, records.LineError):
                raise records.RecordError(f"{rejected_path}:{number}: {entry}; fix or delete the line (a deleted "
                                          "rejection is asked again)")
            if not isinstance(entry.get("id"), str) or not entry["id"]:
                raise records.RecordError(f"{rejected_path}:{number}: rejection entry without an \"id\" string; fix "
                                          "or delete the line (a deleted rejection is asked again)")
            if entry.get("final"):
                done.add(entry["id"])
    return done


def _append_json(path: str, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def distill(questions: Sequence[Question], data_dir: str, teacher: Teacher, workers: int = 4,
            max_regenerations: int = MAX_REGENERATIONS, records_path: str | None = None,
            rejected_path: str | None = None, on_record: Callable[[records.Record], None] | None = None) -> dict:
    """Answer every unfinished question with `teacher`, gate it, append accepted records; returns the summary.

    Files default to `data_dir/records.jsonl`, `data_dir/rejected.jsonl`; the summary is also written to
    `data_dir/distill_summary.json`. Finished = accepted, or rejected by the gate after all regenerations
    (`"final": true` in the rejection log); transport and input failures are logged with `"final": false` and
    retried by the next run. At most `2 * workers` questions are in flight, and only the main thread writes.
    """
    records_path = records_path or os.path.join(data_dir, records.RECORDS_FILE)
    rejected_path = rejected_path or os.path.join(data_dir, REJECTED_FILE)
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate question ids: {duplicates[:5]}")
    for path in (records_path, rejected_path):
        _recover_jsonl(path)
    finished = _finished_ids(records_path, rejected_path)
    todo = [q for q in questions if q.id not in finished]
    stats = DistillStats(questions=len(questions), skipped=len(questions) - len(todo))
    client = getattr(teacher, "client", None)
    retries_before = client.retries if client is not None else 0

    def record_outcome(outcome: _Outcome) -> None:
        q = outcome.question
        stats.attempts += len(outcome.results)
        stats.regenerations += max(0, len(outcome.results) - 1)
        for result in outcome.results:
            for name in quality_gate.ROUNDS[:result.rounds_passed + (0 if result.accepted else 1)]:
                stats.round_reached[name] += 1
            if not result.accepted:
                stats.round_failed[result.round] += 1
        if outcome.record is not None:
            records.append_record(records_path, outcome.record)
            stats.accepted += 1
            stats.first_attempt_accepted += len(outcome.results) == 1
            stats.per_type[q.question_type]["accepted"] += 1
            if on_record is not None:
                on_record(outcome.record)
            return
        final = outcome.error is None
        reasons = [f"{r.round}: {r.violation}" for r in outcome.results if not r.accepted]
        # The rejected replies themselves too: they were paid for, and a gate too strict for some wording can be
        # audited (or its replies rescued) from them without asking again.
        _append_json(rejected_path, {"id": q.id, "question_type": q.question_type, "final": final,
                                     "error": outcome.error, "attempts": len(outcome.results), "reasons": reasons,
                                     "outputs": [o if isinstance(o, str) else json.dumps(o) for o in outcome.outputs]})
        if final:
            stats.rejected += 1
            stats.per_type[q.question_type]["rejected"] += 1
        else:
            stats.failed += 1
            stats.per_type[q.question_type]["failed"] += 1
            logging.warning("%s: not finished (%s); a rerun will retry it", q.id, outcome.error)

    inputs = _InputCache(data_dir, size=2 * max(1, workers) + 2)
    pending: set[concurrent.futures.Future] = set()

    def settle_one() -> None:
        """Record the outcomes that have finished (waiting for at least one); re-raise a worker's error after."""
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        errors = []
        for future in done:
            pending.discard(future)  # one at a time: interrupted here, the rest are still recorded (below)
            if future.exception() is None:
                record_outcome(future.result())
            else:
                errors.append(future.exception())
        if errors:
            raise errors[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            for question in todo:
                pending.add(pool.submit(_answer_one, teacher, question, inputs, max_regenerations))
                if len(pending) >= 2 * max(1, workers):
                    settle_one()
            while pending:
                settle_one()
        except BaseException:
            # Ctrl-C, an auth error: questions not started are dropped, the ones being answered finish (their
            # replies are paid for) and are recorded before the error goes on; they were lost before.
            pool.shutdown(wait=True, cancel_futures=True)
            for future in pending:
                if not future.cancelled() and future.exception() is None:
                    record_outcome(future.result())
            raise
    if client is not None:
        stats.transport_retries = client.retries - retries_before
    summary = stats.summary()
    if client is not None:  # this run's requests and tokens (a client used before counts from its start)
        summary["api_usage"] = dict(client.usage)
    atomic_write(os.path.join(data_dir, SUMMARY_FILE), lambda f: json.dump(summary, f, indent=2))
    return summary


DRY_RUN_FILE = "teacher_prompts.jsonl"


def dry_run(questions: Sequence[Question], data_dir: str, max_regenerations: int = MAX_REGENERATIONS,
            max_retries: int = 0, records_path: str | None = None, rejected_path: str | None = None) -> dict:
    """What `distill` would ask, without asking: `data_dir/teacher_prompts.jsonl` holds one line per unfinished
    question ({"id", "question_type", "user_prompt"}; every request also carries SYSTEM_PROMPT and the
    teacher-only overlay of its image), and the returned counts bound the requests: at least one per question,
    at most (1 + max_regenerations) x (1 + max_retries)."""
    records_path = records_path or os.path.join(data_dir, records.RECORDS_FILE)
    rejected_path = rejected_path or os.path.join(data_dir, REJECTED_FILE)
    for path in (records_path, rejected_path):
        _recover_jsonl(path)
    finished = _finished_ids(records_path, rejected_path)
    todo = [q for q in questions if q.id not in finished]
    path = os.path.join(data_dir, DRY_RUN_FILE)
    atomic_write(path, lambda f: f.writelines(
        json.dumps({"id": q.id, "question_type": q.question_type, "user_prompt": user_prompt(q)},
                   ensure_ascii=False) + "\n" for q in todo))
    return {"questions": len(questions), "finished": len(questions) - len(todo), "to_ask": len(todo),
            "requests_at_least": len(todo), "requests_at_most": len(todo) * (1 + max_regenerations) * (1 + max_retries),
            "system_prompt_chars": len(SYSTEM_PROMPT), "prompts": path}


def make_teacher(kind: str, api: ApiConfig | None = None) -> Teacher:
    """"geometry" (offline) or "api" (needs `api`)."""
    if kind == "geometry":
        return GeometryTeacher()
    if kind == "api":
        if api is None:
            raise ValueError("the api teacher needs an ApiConfig (base_url, model, api_key_env)")
        return ApiTeacher(ChatClient(api))
    raise ValueError(f"unknown teacher {kind!r} (expected 'geometry' or 'api')")
