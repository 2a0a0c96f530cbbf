"""Names sparsealloc writes into the study store (Optuna user attributes): stored data, so API.

Here (in core) so that every layer, the objectives that produce a trial's record included, names
them from one place. Renaming one makes stored studies unreadable.
"""

#: The store URL used when none is given.
DEFAULT_STORAGE = "sqlite:///sparsealloc.db"

# Trial user attributes.
PLAN = "plan"  #: the trial's AllocationPlan as a dict
WARM_START = "warm_start"  #: name of the hand-made allocation the trial scores (uniform, owl...)
FAIL_REASON = "fail_reason"  #: one-line reason of a FAIL trial
RETRY_OF = "retry_of"  #: number of the failed trial whose parameters this one redoes
GENERATION = "generation"  #: NSGA-III generation index of the individual
SOURCE = "source"  #: which sampler proposed the trial (e.g. "pymoo-nsga3")
TRIAL_SECONDS = "trial_seconds"  #: the evaluator's own time for the trial
PRUNED_AT_STEP = "pruned_at_step"  #: step at which early stopping stopped the trial
ACHIEVED_SPARSITY = "achieved_sparsity"  #: parameter-weighted sparsity the pruned model reached
KV_BYTES = "kv_bytes_per_token"  #: KV-cache bytes per token of the plan (analytic; plans with KV bits)
DATABASE_BUILD_SECONDS = "database_build_seconds"  #: time the trial spent filling the level database
CALIBRATION_TOKENS = "calibration_tokens"  #: tokens a selection stage scored the trial on (evo)
EVO_ROLE = "evo_role"  #: evo: offspring, parent (re-scored), merged or rescored (evo.merge), queued (warm start, retry)
STAGE = "stage"  #: evo: the last selection stage the trial reached
EVO_ELIMINATED = "evo_eliminated"  #: evo: pruned by a selection stage
EVO_PREDICTED = "evo_predicted"  #: evo with evo.guide: the switch model's predicted change of the value

# Study user attributes.
SPEC_ATTR = "sparsealloc:spec"  #: the StudySpec as a dict
SPEC_HASH = "spec_hash"  #: StudySpec.spec_hash() of that spec
SAMPLER = "sampler"  #: the spec's sampler name
VALIDATION = "validation"  #: ValidationResult.to_dict(): held-out perplexity of re-scored trials
WARM_START_GRID = "warm_start_grid"  #: {rule: {parameter: chosen value, "proxy": value}} of screened warm starts
EVO_PARENT = "evo:parent"  #: evo: {"generation", "trial", "history"} of the current parent
