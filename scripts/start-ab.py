#!/usr/bin/env python3
"""Interleaved A/B of the start to /readyz of two (or more) tokenwarden binaries.

    python3 scripts/start-ab.py OLD_BINARY NEW_BINARY      # N=100000 ROUNDS=5 PORT=7788

Starts a redis-server of its own on PORT, seeds N providers shaped like the fleet
benchmark's (four per tenant, a JWT-sized access token), lets the first binary start once
(it writes the health hashes, so every measured start is a restart), then starts the
binaries in turn, ROUNDS times each (order alternating), and prints for each start the
seconds to /readyz 200, the daemon's CPU seconds and Redis's CPU seconds, then medians.
The machine's speed drifts over minutes: compare binaries only within one run.
Needs redis-server and redis-cli on PATH.
"""
import os, subprocess, sys, time, socket, statistics, signal, urllib.request, tempfile
from datetime import datetime, timedelta, timezone
WORK=tempfile.mkdtemp(prefix="tw-start-ab-")
PORT=int(os.environ.get("PORT","7788"))
N=int(os.environ.get("N","100000"))
bins=sys.argv[1:]
if not bins:
    raise SystemExit(__doc__)
def redis(*a):
    return subprocess.run(["redis-cli","-p",str(PORT),*a],capture_output=True,text=True).stdout.strip()
def start_redis():
    subprocess.run(["redis-cli","-p",str(PORT),"shutdown","nosave"],capture_output=True)
    time.sleep(0.3)
    subprocess.Popen(["redis-server","--port",str(PORT),"--save","","--appendonly","no","--daemonize","yes","--logfile",os.path.join(WORK,"redis.log")])
    for _ in range(100):
        if redis("ping")=="PONG": return
        time.sleep(0.05)
def cmd(*args):
    out=[b"*%d\r\n"%len(args)]
    for a in args:
        a=a.encode() if isinstance(a,str) else a
        out.append(b"$%d\r\n%s\r\n"%(len(a),a))
    return b"".join(out)
def seed():
    types=["goto","teams","ringcentral","zoom"]
    exp=(datetime.utcnow()+timedelta(hours=20)).strftime("%Y-%m-%dT%H:%M:%S.%f")
    body="x"*880
    buf=[]
    for i in range(N):
        t="r%06d"%(i//4); p=types[i%4]
        f=["provider_type",p,"status","active","auth_type","oauth","client_id","cid-r-%07d"%i,"client_secret","sec-r-%07d-Zk4qT9vB2mXw8RfL"%i,
           "account_key",str(4266846632996939781+i),"access_token","eyJhbGciOiJSUzI1NiJ9.r0%08d.%s"%(i,body),"refresh_token","rt-r-0-%07d-4f1c9a0e2b7d4e8a"%i,
           "token_expiry",exp,"scopes",'["a.read", "b.write"]',"api_base_url","http://127.0.0.1:9/api/%s/v1"%p,
           "features_enabled",'["users", "extensions", "call_queues", "auto_attendants"]',"sync_enabled","True",
           "created_at","2025-01-15T10:30:00.123456","updated_at","2025-01-15T10:30:00.123456","token_url","http://127.0.0.1:9/token"]
        if p=="goto": f+=["health_path","/admin/rest/v1/me"]
        buf.append(cmd("HSET","tenant:%s:provider:%s"%(t,p),*f))
        buf.append(cmd("SADD","tenant:%s:providers"%t,p))
        if i%4==0: buf.append(cmd("HSET","tenant:%s:config"%t,"name","Tenant","primary_provider","goto"))
    subprocess.run(["redis-cli","-p",str(PORT),"--pipe"],input=b"".join(buf),capture_output=True)
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
def cpu(pid):
    st=open("/proc/%d/stat"%pid).read().rsplit(")",1)[1].split()
    return (int(st[11])+int(st[12]))/os.sysconf("SC_CLK_TCK")
def redis_cpu():
    info=redis("info","cpu")
    d=dict(l.split(":") for l in info.splitlines() if ":" in l)
    return float(d["used_cpu_sys"])+float(d["used_cpu_user"])
def run(binary):
    port=free_port()
    env={k:v for k,v in os.environ.items() if not k.startswith("TOKENWARDEN_")}
    env.update(TOKENWARDEN_REDIS_URL="redis://127.0.0.1:%d"%PORT,TOKENWARDEN_LISTEN="127.0.0.1:%d"%port,TOKENWARDEN_LOG="info",
               TOKENWARDEN_STATE_DIR=tempfile.mkdtemp(dir=WORK),TOKENWARDEN_SYNC_ENABLED="false",TOKENWARDEN_HEALTH_ENABLED="false")
    rc0=redis_cpu()
    t0=time.time()
    p=subprocess.Popen([binary,"run"],env=env,stdout=open(os.path.join(WORK,"%s.log"%os.path.basename(binary)),"w"),stderr=subprocess.STDOUT)
    while True:
        try:
            if urllib.request.urlopen("http://127.0.0.1:%d/readyz"%port,timeout=1).status==200: break
        except Exception: pass
        if time.time()-t0>120: raise SystemExit("not ready")
        time.sleep(0.01)
    ready=time.time()-t0
    c=cpu(p.pid); rc=redis_cpu()-rc0
    p.send_signal(signal.SIGTERM); p.wait()
    redis("del","tokenwarden:replicas")
    return ready,c,rc
start_redis(); seed()
print("keys",redis("dbsize"),flush=True)
run(bins[0])  # writes health: later starts are restarts
res={b:[] for b in bins}
for r in range(int(os.environ.get("ROUNDS","5"))):
    for b in (bins if r%2==0 else bins[::-1]):
        x=run(b); res[b].append(x)
        print(r,os.path.basename(b),"ready %.3f s daemon cpu %.2f s redis cpu %.2f s"%x,flush=True)
for b in bins:
    print(b,"median ready %.3f cpu %.2f redis %.2f"%tuple(statistics.median(v[i] for v in res[b]) for i in range(3)))
redis("shutdown", "nosave")
