"""Teacher distillation against a local OpenAI-compatible test server: overlay, prompts, HTTP retries, gate
regenerations, rejection log, statistics, the API key never written, and a SIGKILLed run resumed exactly once."""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from vital_jax.data import quality_gate, questions, records, teacher
from vital_jax.data.questions import Question
from vital_jax.data.records import QUESTION_TYPES, STEP_RANGES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "sk-test-5ecret-never-written"
# The client's timeout, and how long the "slow" script's server waits before answering: far apart, so that under a
# fully loaded machine (the suite's two workers and their training subprocesses) an ordinary answer is never late
# (with 0.4 s, two answers of a CI run were, and the retry count was off by two; 2 s is not far from the
# stalls a loaded 2-core machine can give a thread) and a slow one always is.
CLIENT_TIMEOUT_S = 5.0
SLOW_ANSWER_S = 3 * CLIENT_TIMEOUT_S


class _TeacherServer:
    """Chat-completions server whose behaviour per question is the [token] at the end of the student question."""

    SCRIPTS = {"good": ["good"], "leaky": ["leaky", "good"], "alwaysleaky": ["leaky"],
               "malformed": ["malformed", "good"], "steps": ["wrong_steps", "good"], "flaky": [500, 500, "good"],
               "slow": ["slow", "good"], "down": [500], "paced": ["paced"], "forbidden": [403], "refused": ["refused"],
               "busy": [429, "good"],
               **{f"redirect{code}": [code] for code in (301, 302, 303, 307, 308)}}

    def __init__(self):
        self.calls = collections.Counter()
        self.prompts = collections.defaultdict(list)
        self.auth = []
        self.requests = []          # (method, path, Authorization) of every request, whatever its method
        self.redirect_to = None     # the Location of the redirect scripts' answers
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def parse_request(self):
                parsed = super().parse_request()
                if parsed:
                    with server.lock:
                        server.requests.append((self.command, self.path, self.headers.get("Authorization")))
                return parsed

            def do_POST(self):
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    status, content = server.respond(self.path, self.headers.get("Authorization"), body)
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                                          "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
                                         if status == 200 else {"error": "boom"}).encode()
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", server.redirect_to)
                    if status == 429:
                        self.send_header("Retry-After", "7")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: expected for the slow script

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, path, auth, body):
        assert path == "/v1/chat/completions"
        text = body["messages"][1]["content"][0]["text"]
        question = re.search(r"Student question: (.*)", text).group(1)
        token = re.search(r"\[(\w+)\]", question).group(1)
        steps = int(re.search(r"exactly (\d)|aim for (\d)", text).group(1) or
                    re.search(r"aim for (\d)", text).group(1))
        with self.lock:
            attempt = self.calls[question]
            self.calls[question] += 1
            self.prompts[question].append(text)
            self.auth.append(auth)
        script = self.SCRIPTS[token]
        action = script[min(attempt, len(script) - 1)]
        chain = ["The liver lies in the left part of the image and looks uniform."] * steps
        answer = "Yes, the liver is visible in the left part of the image"
        if isinstance(action, int):
            return action, None
        if action == "slow":
            time.sleep(SLOW_ANSWER_S)
        if action == "paced":
            time.sleep(0.03)
        if action == "leaky":
            return 200, json.dumps({"final_answer": answer, "reasoning_chain": ["The red overlay marks it."] * steps})
        if action == "refused":  # a model's refusal: HTTP 200, content null
            return 200, None
        if action == "malformed":
            return 200, "Sure! Here is the answer: {final_answer: yes}"
        if action == "wrong_steps":
            return 200, json.dumps({"final_answer": answer, "reasoning_chain": chain + chain})
        return 200, json.dumps({"final_answer": answer, "reasoning_chain": chain})


@pytest.fixture
def server():
    s = _TeacherServer()
    yield s
    s.close()


def _dataset(root, tokens, question_type="yes_no"):
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "masks", exist_ok=True)
    image = np.full((32, 32, 3), 90, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:14] = 255
    Image.fromarray(image).save(root / "images/a.png")
    Image.fromarray(mask).save(root / "masks/a_liver.png")
    qs = []
    for i, token in enumerate(tokens):
        qtype = question_type if isinstance(question_type, str) else question_type[i % len(question_type)]
        qs.append(Question(id=f"q{i:03d}_{token}", image="images/a.png", mask="masks/a_liver.png",
                           question=f"Is the liver visible in this CT scan? #{i} [{token}]", question_type=qtype,
                           latent_steps=STEP_RANGES[qtype][1], target="liver", target_type="organ", modality="CT",
                           source="test", normal_anatomy=True, template="yes_no_presence"))
    return qs


def _client(server, **overrides):
    config = dict(base_url=server.base_url, model="teacher-model", api_key_env="VITAL_TEST_TEACHER_KEY",
                  timeout_s=CLIENT_TIMEOUT_S, max_retries=3, backoff_s=0.01)
    config.update(overrides)
    return teacher.ChatClient(teacher.ApiConfig(**config))


# ------------------------------------------------------------------------------------------------ overlay
def test_overlay_is_red_at_alpha_04_with_a_yellow_boundary():
    image = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    out = teacher.render_overlay(image, mask)
    assert tuple(out[20, 20]) == (round(0.6 * 100 + 0.4 * 255), 60, 60)
    assert tuple(out[10, 15]) == (255, 255, 0) and tuple(out[29, 29]) == (255, 255, 0)
    assert tuple(out[11, 15]) == (162, 60, 60) and tuple(out[9, 15]) == (100, 100, 100)
    assert np.array_equal(out[~mask], image[~mask])
    with pytest.raises(ValueError, match="differ in size"):
        teacher.render_overlay(image, mask[:-1])


# ------------------------------------------------------------------------------------------------ prompts
def test_system_prompt_has_every_component_of_appendix_a2():
    p = teacher.SYSTEM_PROMPT
    for phrase in ("You are a teacher", "Teacher-only information", "Never mention or imply", "visible evidence",
                   "image space only", "patient's left", "strict JSON", '"final_answer"', '"reasoning_chain"',
                   "no code fences", "lucency for darker", "separate regions", "midline", "grammatical"):
        assert phrase in p, phrase


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_user_prompt_example_passes_the_gate_with_the_type_step_range(question_type):
    q = Question(id="x", image="i", mask="m", question="Where is the liver?", question_type=question_type,
                 latent_steps=STEP_RANGES[question_type][0], target="liver", target_type="organ", modality="CT",
                 source="s", normal_anatomy=False, template="t",
                 choices=("left", "right", "center") if question_type == "location_choice" else ())
    prompt = teacher.user_prompt(q)
    assert "Target (teacher-only" in prompt and "Student question: Where is the liver?" in prompt
    assert f"Question type: {question_type}" in prompt
    example = prompt.splitlines()[-1]
    context = quality_gate.GateContext(question_type, "liver", "organ", False, q.choices, q.modality)
    result = quality_gate.check(example, context)
    assert result.accepted, result.violation
    low, high = STEP_RANGES[question_type]
    assert (f"exactly {low} reasoning step" in prompt) if low == high else (f"{low} to {high}" in prompt)


# ------------------------------------------------------------------------------------------------- client
def test_client_retries_5xx_and_timeouts_with_exponential_backoff(server, monkeypatch, tmp_path):
    monkeypatch.setenv("VITAL_TEST_TEACHER_KEY", API_KEY)
    sleeps = []
    client = teacher.ChatClient(_client(server).config, sleep=sleeps.append, jitter=lambda: 0.0)
    qs = _dataset(tmp_path, ["flaky", "slow", "down"])
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.ones((32, 32), bool)
    api = teacher.ApiTeacher(client)
    assert json.loads(api.generate(qs[0], image, mask))["final_answer"].startswith("Yes")
    assert sleeps == [0.01, 0.02] and client.retries == 2
    sleeps.clear()
    assert json.loads(api.generate(qs[1], image, mask))["final_answer"].startswith("Yes")
    assert sleeps == [0.01]
    sleeps.clear()
    with pytest.raises(teacher.TeacherTransportError, match=r"failed after 4 attempts \(HTTP 500"):
        api.generate(qs[2], image, mask)
    assert sleeps == [0.01, 0.02, 0.04]
    assert server.auth and set(server.auth) == {f"Bearer {API_KEY}"}


def test_retries_wait_as_long_as_the_server_asks_and_spread_out(server, monkeypatch, tmp_path):
    """A 429's Retry-After was ignored (the next try came 2 s later, still too early), and every worker's retry
    of an outage came at the same moments."""
    monkeypatch.setenv("VITAL_TEST_TEACHER_KEY", API_KEY)
    busy, flaky = _dataset(tmp_path, ["busy", "flaky"])
    image, mask = np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool)
    sleeps = []
    client = teacher.ChatClient(_client(server).config, sleep=sleeps.append, jitter=lambda: 0.5)
    teacher.ApiTeacher(client).generate(busy, image, mask)
    assert sleeps == [7.0]
    sleeps.clear()
    teacher.ApiTeacher(client).generate(flaky, image, mask)
    assert sleeps == pytest.approx([0.01 * 1.125, 0.02 * 1.125])
    assert teacher._retry_after("Wed, 21 Oct 2026 07:28:00 GMT") == 0.0 and teacher._retry_after("9999") == 600.0


def test_client_does_not_retry_client_errors_and_needs_its_key(server, monkeypatch, tmp_path):
    monkeypatch.delenv("VITAL_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(teacher.TeacherTransportError, match="VITAL_TEST_TEACHER_KEY is not set"):
        _client(server).complete([{"role": "user", "content": "hi"}])
    q, = _dataset(tmp_path, ["forbidden"])
    sleeps = []
    api = teacher.ApiTeacher(teacher.ChatClient(_client(server, api_key_env="").config, sleep=sleeps.append))
    with pytest.raises(teacher.TeacherTransportError, match=r"HTTP 403 .*\(not retried\)"):
        api.generate(q, np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool))
    assert server.calls[q.question] == 1 and sleeps == []
    refused = _client(server, base_url="http://127.0.0.1:9", api_key_env="", max_retries=1)
    with pytest.raises(teacher.TeacherTransportError, match="failed after 2 attempts"):
        refused.complete([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_naming_its_host_and_the_key_never_reaches_it(server, monkeypatch, tmp_path, status):
    """urllib follows 301/302/303 of a POST (as a GET) with the Authorization header copied: to another host, the
    key would leak there."""
    monkeypatch.setenv("VITAL_TEST_TEACHER_KEY", API_KEY)
    elsewhere = _TeacherServer()
    try:
        server.redirect_to = elsewhere.base_url.replace("127.0.0.1", "localhost") + "/chat/completions"
        q, = _dataset(tmp_path, [f"redirect{status}"])
        sleeps = []
        api = teacher.ApiTeacher(teacher.ChatClient(_client(server).config, sleep=sleeps.append))
        port = elsewhere.httpd.server_address[1]
        with pytest.raises(teacher.TeacherTransportError,
                           match=rf"HTTP {status} .*a redirect to host 'localhost:{port}'; not followed") as error:
            api.generate(q, np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool))
        assert API_KEY not in str(error.value) and server.calls[q.question] == 1 and sleeps == []
        assert elsewhere.requests == []
    finally:
        elsewhere.close()


@pytest.mark.parametrize("url, shown", [
    ("https://user:s3cret@api.example.com/v1/chat/completions", "https://***@api.example.com/v1/chat/completions"),
    ("https://s3cret@api.example.com:8443/v1", "https://***@api.example.com:8443/v1"),
    ("https://api.example.com/v1?key=s3cret&x=1", "https://api.example.com/v1?***"),
    ("https://api.example.com/v1#s3cret", "https://api.example.com/v1#***"),
    ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8000/v1/chat/completions"),
    ("user:s3cret@api.example.com/v1", "<not a URL>"),
    ("http://[::1/s3cret", "<not a URL>"),
])
def test_redact_url_hides_userinfo_query_and_fragment(url, shown):
    assert teacher.redact_url(url) == shown


def test_credentials_in_base_url_or_a_malformed_key_are_never_written(server, monkeypatch, tmp_path):
    q, = _dataset(tmp_path, ["good"])
    host = server.base_url.split("//")[1].split(":")[0]
    inputs = (q, np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool))
    # http.client quotes the password (a nonnumeric port) and a URL with a space; urllib an unknown URL type.
    for base_url in (f"http://user:s3cret@{host}/v1", "http://127.0.0.1:9/v1?key=s3cret x", "s3cret@nowhere/v1"):
        client = _client(server, base_url=base_url, api_key_env="", max_retries=0)
        with pytest.raises(teacher.TeacherTransportError) as error:
            teacher.ApiTeacher(client).generate(*inputs)
        assert "s3cret" not in str(error.value), str(error.value)
    monkeypatch.setenv("VITAL_TEST_TEACHER_KEY", API_KEY + "\n")
    with pytest.raises(teacher.TeacherTransportError, match="control characters") as error:
        teacher.ApiTeacher(_client(server, max_retries=0)).generate(*inputs)
    assert API_KEY not in str(error.value)


# --------------------------------------------------------------------------------------------------- runs
def test_distill_regenerates_rejects_and_counts(server, monkeypatch, tmp_path):
    monkeypatch.setenv("VITAL_TEST_TEACHER_KEY", API_KEY)
    tokens = ["good", "leaky", "alwaysleaky", "malformed", "steps", "flaky", "slow", "down"]
    qs = _dataset(tmp_path, tokens, question_type=["yes_no", "describe", "reasoning", "location"])
    api = teacher.ApiTeacher(_client(server))
    summary = teacher.distill(qs, str(tmp_path), api, workers=3)
    accepted = {r.id: r for r in records.read_records(str(tmp_path / records.RECORDS_FILE))}
    assert sorted(i.split("_")[1] for i in accepted) == sorted(["good", "leaky", "malformed", "steps", "flaky", "slow"])
    for r in accepted.values():
        assert len(r.reasoning_chain) == r.latent_steps and r.answer.endswith(".")
    rejected = [json.loads(line) for line in open(tmp_path / teacher.REJECTED_FILE)]
    by_id = {e["id"].split("_")[1]: e for e in rejected}
    assert set(by_id) == {"alwaysleaky", "down"}
    assert by_id["alwaysleaky"]["final"] and by_id["alwaysleaky"]["attempts"] == 1 + teacher.MAX_REGENERATIONS
    assert all(r.startswith("annotation_leakage: ") for r in by_id["alwaysleaky"]["reasons"])
    # The paid replies are kept beside the reasons (they were dropped: a too strict gate could not be audited).
    outputs = by_id["alwaysleaky"]["outputs"]
    assert len(outputs) == 1 + teacher.MAX_REGENERATIONS and all("red overlay" in o for o in outputs)
    assert not by_id["down"]["final"] and "HTTP 500" in by_id["down"]["error"]
    # The regeneration prompt names the violation of the previous attempt.
    leaky_q = next(q.question for q in qs if "[leaky]" in q.question)
    assert "STRICT RULES" not in server.prompts[leaky_q][0]
    assert "rejected by the annotation_leakage check" in server.prompts[leaky_q][1]
    malformed_q = next(q.question for q in qs if "[malformed]" in q.question)
    assert "rejected by the json_schema check" in server.prompts[malformed_q][1]
    # Statistics: 6 accepted + 1 final rejection; attempts = 1+2+5+2+2+1+1 = 14 gated outputs.
    assert summary["accepted"] == 6 and summary["rejected"] == 1 and summary["failed_unfinished"] == 1
    assert summary["attempts"] == 14 and summary["regenerations"] == 7
    rounds = summary["gate_rounds"]
    assert rounds["json_schema"] == {"reached": 14, "failed": 1, "pass_rate": round(13 / 14, 4)}
    assert rounds["annotation_leakage"]["failed"] == 6 and rounds["step_count"]["failed"] == 1
    assert summary["transport_retries"] == 2 + 1 + 3
    assert json.load(open(tmp_path / teacher.SUMMARY_FILE)) == summary
    # A rerun skips finished ids (accepted and final rejections) and retries only the unfinished one.
    calls = sum(server.calls.values())
    again = teacher.distill(qs, str(tmp_path), api, workers=3)
    assert again["skipped_finished"] == 7 and again["failed_unfinished"] == 1
    assert sum(server.calls.values()) - calls == 1 + 3
    # The key is sent to the server but never written anywhere.
    for name in os.listdir(tmp_path):
        if os.path.isfile(tmp_path / name):
            assert API_KEY not in (tmp_path / name).read_text(errors="ignore")


def test_killed_run_restarts_and_yields_every_sample_exactly_once(server, tmp_path):
    qs = _dataset(tmp_path, ["paced"] * 60)
    qpath = str(tmp_path / questions.QUESTIONS_FILE)
    questions.write_questions(qpath, qs)
    script = ("import sys\nfrom vital_jax.data import teacher, questions\n"
              "qs = questions.read_questions(sys.argv[1])\n"
              "api = teacher.ApiTeacher(teacher.ChatClient(teacher.ApiConfig(base_url=sys.argv[2], model='m', "
              "api_key_env='', timeout_s=5, backoff_s=0.01)))\n"
              "teacher.distill(qs, sys.argv[3], api, workers=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, qpath, server.base_url, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / records.RECORDS_FILE
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    written = out.read_text().count("\n")
    assert proc.returncode == -signal.SIGKILL and 10 <= written < 60, proc.stderr.read().decode()
    with open(out, "a") as f:  # as if the kill had torn an append in half
        f.write('{"id": "q999_torn", "ima')
    summary = teacher.distill(qs, str(tmp_path), teacher.ApiTeacher(teacher.ChatClient(teacher.ApiConfig(
        base_url=server.base_url, model="m", api_key_env="", timeout_s=5))), workers=2)
    ids = [r.id for r in records.read_records(str(out))]
    assert sorted(ids) == sorted(q.id for q in qs) and len(ids) == len(set(ids)) == 60
    assert summary["skipped_finished"] == written and summary["accepted"] == 60 - written


def test_a_whole_last_line_without_its_newline_is_kept_and_a_torn_one_dropped(tmp_path):
    """A record whose newline is missing (a hand edit, another tool) is a record: it gets its newline. Only a line
    that is not whole JSON (a crash mid-append) is dropped before distillation appends."""
    whole, torn = tmp_path / "whole.jsonl", tmp_path / "torn.jsonl"
    whole.write_text('{"id": "a"}\n{"id": "b"}')
    torn.write_text('{"id": "a"}\n{"id": "b", "ima')
    for path in (whole, torn):
        teacher._recover_jsonl(str(path))
    assert whole.read_text() == '{"id": "a"}\n{"id": "b"}\n' and torn.read_text() == '{"id": "a"}\n'
    (tmp_path / "split.jsonl").write_bytes(b'{"id": "a"}\n{"id": "\xc3')  # torn inside a UTF-8 character
    teacher._recover_jsonl(str(tmp_path / "split.jsonl"))
    assert (tmp_path / "split.jsonl").read_text() == '{"id": "a"}\n'


@pytest.mark.parametrize("line, message", [
    ("{bad json", r"rejected\.jsonl:2: malformed JSON"),
    ('{"question_type": "yes_no", "final": true}', r"rejected\.jsonl:2: rejection entry without an \"id\""),
    ('"q000_a"', r"rejected\.jsonl:2: not a JSON object"),
])
def test_a_bad_line_of_the_rejection_log_is_named_and_nothing_is_written(tmp_path, line, message):
    qs = _dataset(tmp_path, ["a", "b", "c"])
    log = tmp_path / teacher.REJECTED_FILE
    entry = {"id": qs[0].id, "question_type": "yes_no", "final": True, "error": None, "attempts": 5, "reasons": []}
    log.write_text("\n".join([json.dumps(entry), line, json.dumps({**entry, "id": qs[1].id})]) + "\n")
    before = log.read_text()
    with pytest.raises(records.RecordError, match=message):
        teacher.distill(qs, str(tmp_path), teacher.make_teacher("geometry"), workers=1)
    assert log.read_text() == before and not (tmp_path / records.RECORDS_FILE).exists()


class _ScriptedTeacher:
    """Answers each question with its next scripted reply and keeps the feedback it was given."""

    def __init__(self, replies):
        self.replies, self.feedback = {k: list(v) for k, v in replies.items()}, collections.defaultdict(list)

    def generate(self, question, image, mask, feedback=None):
        self.feedback[question.id].append(feedback)
        answer, chain = self.replies[question.id].pop(0)
        return json.dumps({"final_answer": answer, "reasoning_chain": chain})


def test_closed_answers_the_mask_contradicts_are_regenerated_then_rejected(tmp_path):
    """The API teacher's "Yes" about an absent lesion (its prompt named the lesion and marked the organ) and its
    wrong side were accepted; the offline teacher's verdict (`mask_verdict`) now holds every teacher to the mask."""
    side, absent = _dataset(tmp_path, ["side", "absent"])
    side = dataclasses.replace(side, question="Is the liver located in the left half of the image?",
                               template="yes_no_side", slots={"side": "left"})   # the mask lies in the left third
    absent = dataclasses.replace(absent, question="Is there a liver tumor visible in this CT scan?",
                                 target="liver tumor", target_type="lesion", normal_anatomy=False,
                                 template="yes_no_absent", slots={"organ": "liver"})
    assert "this image shows no liver tumor: the answer is no" in teacher.user_prompt(absent)
    wrong_side = ("No, the liver lies in the right half of the image.", ["The liver lies right of the midline."])
    right_side = ("Yes, the liver lies in the left half of the image.", ["The liver lies left of the midline."])
    present = ("Yes, there is a liver tumor visible in this image.", ["A focal hypodense region sits in the liver."])
    scripted = _ScriptedTeacher({side.id: [wrong_side, right_side],
                                 absent.id: [present] * (1 + teacher.MAX_REGENERATIONS)})
    summary = teacher.distill([side, absent], str(tmp_path), scripted, workers=1)
    accepted = {r.id: r for r in records.read_records(str(tmp_path / records.RECORDS_FILE))}
    assert list(accepted) == [side.id] and accepted[side.id].answer.startswith("Yes")
    assert "rejected by the ground_truth check" in scripted.feedback[side.id][1]
    rejected = [json.loads(line) for line in open(tmp_path / teacher.REJECTED_FILE)]
    assert [e["id"] for e in rejected] == [absent.id] and rejected[0]["final"]
    assert all(r.startswith("ground_truth: the final answer says 'yes'") for r in rejected[0]["reasons"])
    assert summary["gate_rounds"]["ground_truth"]["failed"] == 1 + (1 + teacher.MAX_REGENERATIONS)


def test_a_refusal_is_gated_not_retried_as_a_transport_failure(server, monkeypatch, tmp_path):
    """A 200 reply with content null was a transport error: asked max_retries + 1 times per attempt (each paid),
    then logged unfinished and asked again by every rerun."""
    monkeypatch.setenv("VITAL_TEST_TEACHER_KEY", API_KEY)
    q, = _dataset(tmp_path, ["refused"])
    summary = teacher.distill([q], str(tmp_path), teacher.ApiTeacher(_client(server)), workers=1)
    assert server.calls[q.question] == 1 + teacher.MAX_REGENERATIONS     # one call per gated attempt
    assert summary["rejected"] == 1 and summary["failed_unfinished"] == 0 and summary["transport_retries"] == 0
    entry, = [json.loads(line) for line in open(tmp_path / teacher.REJECTED_FILE)]
    assert entry["final"] and all(r.startswith("json_schema: ") for r in entry["reasons"])


def test_a_missing_or_refused_api_key_stops_distillation_at_once(server, monkeypatch, tmp_path):
    """Every question failed in turn, one warning each, and was logged unfinished."""
    qs = _dataset(tmp_path, ["good"] * 6)
    monkeypatch.delenv("VITAL_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(teacher.TeacherAuthError, match="VITAL_TEST_TEACHER_KEY is not set"):
        teacher.distill(qs, str(tmp_path), teacher.ApiTeacher(_client(server)), workers=2)
    assert sum(server.calls.values()) == 0
    forbidden = _dataset(tmp_path, ["forbidden"] * 6)
    with pytest.raises(teacher.TeacherAuthError, match=r"HTTP 403 .*API key was refused"):
        teacher.distill(forbidden, str(tmp_path), teacher.ApiTeacher(_client(server, api_key_env="")), workers=1)
    assert sum(server.calls.values()) <= 2 and not os.path.exists(tmp_path / teacher.REJECTED_FILE)


def test_ctrl_c_records_the_answers_already_paid_for(tmp_path):
    """The pool's shutdown let the queued questions run after Ctrl-C and dropped their outcomes: 12 calls paid, 4
    records written (workers 4); a rerun asked the 8 again."""
    qs = _dataset(tmp_path, [f"t{i}" for i in range(20)])
    answer = ("Yes, the liver is visible in the left part of the image.",
              ["The liver lies in the left part of the image and looks uniform."])
    paid = []

    class Slow:
        name = "slow"

        def generate(self, question, image, mask, feedback=None):
            time.sleep(0.05)
            paid.append(question.id)
            return json.dumps({"final_answer": answer[0], "reasoning_chain": answer[1]})

    interrupted = []

    def interrupt(record):  # Ctrl-C once, while the first record is handled
        if not interrupted:
            interrupted.append(record.id)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        teacher.distill(qs, str(tmp_path), Slow(), workers=3, on_record=interrupt)
    written = [r.id for r in records.read_records(str(tmp_path / records.RECORDS_FILE))]
    assert 1 < len(paid) < len(qs) and sorted(written) == sorted(paid)


def test_a_request_budget_stops_the_run_keeping_its_answers_and_usage_is_reported(server, monkeypatch, tmp_path):
    """No limit on what a build could spend, and the endpoint's token counts were dropped."""
    monkeypatch.setenv("VITAL_TEST_TEACHER_KEY", API_KEY)
    qs = _dataset(tmp_path, ["good"] * 6)
    with pytest.raises(teacher.TeacherBudgetError, match=r"budget of 3 requests \(teacher.max_requests\)"):
        teacher.distill(qs, str(tmp_path), teacher.ApiTeacher(_client(server, max_requests=3)), workers=1)
    assert sum(server.calls.values()) == 3
    assert len(records.read_records(str(tmp_path / records.RECORDS_FILE))) == 3   # the paid answers are kept
    summary = teacher.distill(qs, str(tmp_path), teacher.ApiTeacher(_client(server)), workers=2)  # goes on
    assert summary["skipped_finished"] == 3 and summary["accepted"] == 3
    assert summary["api_usage"] == {"requests": 3, "prompt_tokens": 300, "completion_tokens": 60}
