"""A tiny runnable LLM text-stage run (train.py, one `text` stage); every field can be
overridden with `--config.FIELD=value` (`--config.stages.text.optim.lr=1e-3`,
`--config.stages.text.data.seq_len=256`).

Make the inputs first (a tiny random LLaMA + tokenizer, and text-only records):

    python demo.py --work-dir /tmp/demo      # /tmp/demo/flax (model) and /tmp/demo/hf (tokenizer)
    python -c "from metamorph_jax.data.text_records import write_text_records as w; w('/tmp/demo/text.jsonl')"

then:

    python train.py --config configs/text_tiny.py --config.stages.text.steps=20
    python generate.py --llm /tmp/text_tiny/text/final --prompt "how many shapes" --chat
    python eval.py --llm /tmp/text_tiny/text/final --tokenizer /tmp/demo/hf --data /tmp/demo/text.jsonl

Records are LLaVA-style conversation JSONL without images (a record with an image or
video field is an error naming its file and line). The run writes WORK_DIR/config.json,
metrics.jsonl, tensorboard/, text/checkpoints/ and text/final/ (a model folder with the
tokenizer); running it again resumes, or does nothing once text/final/ is done. The
schema is the one of every stage (configs/tiny.py, runner.RUN_FIELDS / STAGE_FIELDS).
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.work_dir = "/tmp/text_tiny"
    config.seed = 0
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
    config.order = ("text",)
    config.checkpoint_every = 50
    config.keep = 2
    config.async_checkpoints = True
    config.log_every = 1                         # steps between metric fetches / lines
    config.eval_every = 0
    config.eval_batches = 1
    config.skip_nonfinite = False
    config.assets = ml_collections.ConfigDict(dict(kind=""))

    stage = ml_collections.ConfigDict()
    stage.kind = "text"
    stage.steps = 100
    stage.allow_short = False   # finite data ending before `steps` is an error
    stage.init = ml_collections.ConfigDict(dict(
        llm_dir="/tmp/demo/flax",                # a converted model folder (python -m convert to-flax llama)
        tokenizer_dir="/tmp/demo/hf", from_previous=False,
        llm_arch=""))   # train.py --plan: the architecture to build when llm_dir is absent
    stage.data = ml_collections.ConfigDict()     # pipeline.from_config fields (DataConfig)
    # name -> pipeline.Source fields; a mapping so that --config.stages.text.data.sources.text.path=F works
    stage.data.sources = ml_collections.ConfigDict()
    stage.data.sources.text = dict(path="/tmp/demo/text.jsonl", weight=1.0)
    stage.data.seq_len = 128
    stage.data.batch_size = 8                    # rows per process; must divide over data x fsdp
    stage.data.template = "llama3"
    stage.data.seed = 0
    stage.data.num_epochs = config_dict.placeholder(int)  # None: repeat (reshuffled each epoch)
    stage.data.worker_count = 0
    stage.data.strict = False                    # True: stop at the first unusable record
    stage.eval_data = ml_collections.ConfigDict(dict(sources={}))   # no held-out evaluation
    stage.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, schedule="warmup_cosine", warmup=0.03,   # the paper's 3% warm-up, then cosine
        end_ratio=0.0, decay_end_step=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip=1.0))                          # global-norm clip; 0 disables
    stage.grad_accum_steps = 1
    stage.dtype = "float32"                      # compute dtype; params and Adam state stay fp32
    stage.remat_policy = "none"                  # or a name in models/layers.py REMAT_POLICIES
    stage.loss_chunk_tokens = 0                  # > 0: LM head + loss over chunks of this many positions
    # None: the folder's layer layout. False trains unrolled layers (~10% faster on CPU,
    # slower to compile); final/ keeps the folder's layout either way.
    stage.scan_layers = config_dict.placeholder(bool)
    config.stages = ml_collections.ConfigDict(dict(text=stage))
    return config
