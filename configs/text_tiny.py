"""A tiny runnable LLM text-stage run (train.py); every field can be overridden with
`--config.FIELD=value` (nested: `--config.optim.lr=1e-3`, `--config.data.seq_len=256`).

Make the inputs first (a tiny random LLaMA + tokenizer, and text-only records):

    python demo.py --work-dir /tmp/demo      # /tmp/demo/flax (model) and /tmp/demo/hf (tokenizer)
    python -c "from metamorph_jax.training.text_loop import write_text_records as w; w('/tmp/demo/text.jsonl')"

then:

    python train.py --config configs/text_tiny.py --config.steps=20
    python generate.py --llm /tmp/text_tiny/final --tokenizer /tmp/text_tiny/final --prompt "how many shapes" --chat
    python eval.py --llm /tmp/text_tiny/final --tokenizer /tmp/demo/hf --data /tmp/demo/text.jsonl

Records are LLaVA-style conversation JSONL without images (a record with an image or
video field is an error: the image stages come later). The run writes
WORK_DIR/config.json, metrics.jsonl, tensorboard/ and final/ (a model folder with the
tokenizer); WORK_DIR/final must not exist yet.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.llm_dir = "/tmp/demo/flax"           # a converted model folder (python -m convert to-flax llama)
    config.tokenizer_dir = "/tmp/demo/hf"
    config.work_dir = "/tmp/text_tiny"
    config.steps = 100
    config.dtype = "float32"                     # compute dtype; params and Adam state stay fp32
    config.remat_policy = "none"                 # or a name in models/layers.py REMAT_POLICIES
    # None: the folder's layer layout. False trains unrolled layers (~10% faster on CPU,
    # slower to compile); final/ keeps the folder's layout either way.
    config.scan_layers = config_dict.placeholder(bool)
    config.log_every = 1                         # steps between metric fetches / lines

    config.data = ml_collections.ConfigDict()    # pipeline.from_config fields (DataConfig)
    # name -> pipeline.Source fields; a mapping so that --config.data.sources.text.path=F works
    config.data.sources = ml_collections.ConfigDict()
    config.data.sources.text = dict(path="/tmp/demo/text.jsonl", weight=1.0)
    config.data.seq_len = 128
    config.data.batch_size = 8                   # rows per process; must divide over data x fsdp
    config.data.template = "llama3"
    config.data.seed = 0
    config.data.num_epochs = None                # repeat the records (reshuffled each epoch)
    config.data.worker_count = 0
    config.data.strict = False                   # True: stop at the first unusable record

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 1e-3
    config.optim.warmup_ratio = 0.03             # the paper's 3% warm-up, then cosine decay
    config.optim.end_ratio = 0.0                 # final lr = lr * end_ratio
    config.optim.weight_decay = 0.0              # the paper trains with wd 0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip = 1.0                 # global-norm clip; 0 disables

    config.mesh = ml_collections.ConfigDict()    # sharding.make_mesh; -1 takes the remaining devices
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    return config
