#!/usr/bin/env python3
"""Worst event-loop stall of `segsync run` during a first sync: the largest gap between WATCHDOG=1
pings (sent every WATCHDOG_USEC/2) from READY until the first `rule run` event, minus the ping period.
usage: measure.py BINARY CONTACTS"""
import json, os, socket, subprocess, sys, tempfile, time, signal
binary, contacts = sys.argv[1], int(sys.argv[2])
d = tempfile.mkdtemp()
os.makedirs(f"{d}/rules")
open(f"{d}/rules/everyone.rhai", "w").write('const LIST = "Everyone";\nfn matches(contact) { true }\n')
open(f"{d}/config.toml", "w").write(f'''[api]
base_url = "sandbox"
plan = "unlimited"
[sandbox]
contacts = {contacts}
[rules]
dir = "rules"
[state]
path = "state/segsync.db"
[guards]
max_removal_share = 1.0
''')
sock_path = f"{d}/notify.sock"
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sock_path); s.settimeout(0.05)
usec = 200_000
env = dict(os.environ, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC=str(usec), RUST_LOG="info")
env.pop("WATCHDOG_PID", None)
logf = open(f"{d}/log.jsonl", "w")
p = subprocess.Popen([binary, "run", "--config", f"{d}/config.toml", "--log-format", "json"], env=env,
                     stderr=logf, stdout=subprocess.DEVNULL, text=True)
reader = open(f"{d}/log.jsonl")
pings, ready, done, buf, t0 = [], None, None, "", time.monotonic()
while done is None and time.monotonic() - t0 < 1800:
    try:
        msg = s.recv(4096).decode()
        now = time.monotonic()
        if "READY=1" in msg and ready is None: ready = now
        if "WATCHDOG=1" in msg: pings.append(now)
    except socket.timeout:
        pass
    chunk = reader.read()
    if chunk:
        buf += chunk
        *lines, buf = buf.split("\n")
        for line in lines:
            try: ev = json.loads(line)
            except ValueError: continue
            f = ev.get("fields", ev)
            msg = f.get("message") or ev.get("message")
            if msg == "rule run":
                done = time.monotonic(); print("rule run:", {k: f.get(k) for k in ("added", "outcome", "duration_ms")})
p.send_signal(signal.SIGTERM); p.wait(timeout=120)
ps = [t for t in pings if ready and ready <= t <= done]
gaps = [b - a for a, b in zip(ps, ps[1:])]
print(f"pings {len(ps)} over {done - ready:.1f} s; max gap {max(gaps)*1000:.0f} ms; worst stall {max(gaps)*1000 - usec/2000:.0f} ms beyond the {usec/2000:.0f} ms period")
