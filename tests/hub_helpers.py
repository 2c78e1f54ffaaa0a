"""Helpers for the hub tests: agents' git repositories and a hub server in a subprocess (loopback only)."""

import os
import resource
import signal
import socket
import subprocess
import sys
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="agent", GIT_AUTHOR_EMAIL="agent@example.invalid",
               GIT_COMMITTER_NAME="agent", GIT_COMMITTER_EMAIL="agent@example.invalid",
               GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
BASELINE_FILES = ("train.py", "prepare.py", "pyproject.toml", "uv.lock")


def run_git(repo, *args, input=None):
    """git in repo; returns stdout (str), raises on failure."""
    result = subprocess.run(["git", "-C", str(repo), *args], env=GIT_ENV, input=input, capture_output=True, text=True)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout.strip()


def baseline_repo(path, train="LR = 0.04\n", prepare="METRIC = 'bpb'\n"):
    """A git repository with one root commit holding the four baseline files; returns its hash."""
    os.makedirs(path, exist_ok=True)
    run_git(path, "init", "-q", "-b", "agenthub")
    contents = dict(zip(BASELINE_FILES, (train, prepare, "[project]\nname = 'x'\n", "version = 1\n")))
    for name, text in contents.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    run_git(path, "add", *BASELINE_FILES)
    run_git(path, "commit", "-q", "-m", "baseline")
    return run_git(path, "rev-parse", "HEAD")


def commit_file(repo, name, text, message):
    """Write name (text, or delete it when text is None), commit everything; returns the new hash."""
    path = os.path.join(repo, name)
    if text is None:
        run_git(repo, "rm", "-q", name)
    else:
        with open(path, "w") as f:
            f.write(text)
        run_git(repo, "add", name)
    run_git(repo, "commit", "-q", "-m", message)
    return run_git(repo, "rev-parse", "HEAD")


def bundle(repo, rev="HEAD"):
    """Bytes of `git bundle create <file> <rev>` in repo (rev may be a range like A..HEAD)."""
    path = os.path.join(repo, ".git", "test.bundle")
    run_git(repo, "bundle", "create", "-q", path, rev)
    with open(path, "rb") as f:
        return f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack_bundle(repo, head, extra=()):
    """A bundle of head's history (ref refs/heads/agenthub) whose pack also holds the objects `extra`."""
    objects = run_git(repo, "rev-list", "--objects", head).split("\n") + list(extra)
    pack = subprocess.run(["git", "-C", str(repo), "pack-objects", "-q", "--stdout"], input="\n".join(objects).encode()
                          + b"\n", capture_output=True, check=True).stdout
    return f"# v2 git bundle\n{head} refs/heads/agenthub\n\n".encode() + pack


def fake_git(directory, command, child=False):
    """A `git` in directory that, for `git ... <command> ...`, writes its pid to directory/pid and sleeps a
    minute (with child: first starts a child of its own that holds stdout too, as `git bundle create` runs
    `git pack-objects`, and that creates directory/child.done if it lives 20 s); any other command runs the
    real git.
    Put directory first on PATH. Returns the path of the pid file."""
    real = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True, check=True).stdout.strip()
    spawn = f'(sleep 20; touch "{directory}/child.done") & ' if child else ""
    path = os.path.join(directory, "git")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nfor a in "$@"; do if [ "$a" = {command} ]; then {spawn}echo $$ > "{directory}/pid"; '
                f'exec sleep 60; fi; done\nexec {real} "$@"\n')
    os.chmod(path, 0o755)
    return os.path.join(directory, "pid")


def alive(pid):
    """Whether process pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


class HubProcess:
    """`python hub/server.py --data DIR --port PORT` as a subprocess; env adds variables (HUB_CRASH_AT);
    files caps its file descriptors (RLIMIT_NOFILE, soft and hard)."""

    def __init__(self, data, env=None, args=(), files=None):
        self.data, self.port = str(data), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))) if files else None
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "hub", "server.py"), "--data", self.data,
                                      "--port", str(self.port), *args], env=dict(os.environ, **(env or {})),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=limit)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.url + "/api/channels", timeout=5)
                return
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("hub did not start: " + self.proc.stdout.read())
                time.sleep(0.05)

    def kill(self):
        """SIGKILL, like a power cut for the process (not for the page cache); self.log: what it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log = self.proc.stdout.read()
        self.proc.stdout.close()

    def register(self, name):
        answer = requests.post(self.url + "/api/register", json={"id": name}, timeout=30)
        assert answer.status_code == 201, answer.text
        return {"Authorization": "Bearer " + answer.json()["api_key"]}
