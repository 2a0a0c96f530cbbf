"""PostgreSQL cost of one Optuna trial (30 params, plan attr, 4 intermediate values, tell), with and without synchronous_commit.

    python benchmarks/pg_commit_cost.py ""                          # server default
    python benchmarks/pg_commit_cost.py "-c synchronous_commit=off"
"""
import time, uuid, optuna, sys
from optuna.distributions import FloatDistribution
from sparsealloc.core.keys import PLAN
from sparsealloc.storage.optuna_adapter import trial_id_of
optuna.logging.set_verbosity(optuna.logging.WARNING)
url="postgresql+psycopg2://postgres@127.0.0.1:5432/test"
opts=sys.argv[1]
ca={"connect_timeout":10}
if opts: ca["options"]=opts
st=optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping":True,"connect_args":ca})
name="micro-"+uuid.uuid4().hex[:6]
s=optuna.create_study(study_name=name, storage=st, sampler=optuna.samplers.RandomSampler(seed=0))
d={f"sparsity/block_{i:02d}":FloatDistribution(0.2,0.8) for i in range(30)}
plan={f"model.layers.{i}.mlp.down_proj":0.5 for i in range(210)}
t=time.perf_counter(); n=10
for _ in range(n):
    tr=s.ask(d); st.set_trial_user_attr(trial_id_of(tr),PLAN,plan)
    for k in range(4): st.set_trial_intermediate_value(trial_id_of(tr),k,0.1)
    s.tell(tr,0.5)
print(opts or "default", (time.perf_counter()-t)/n*1000, "ms/trial")
optuna.delete_study(study_name=name, storage=st)
