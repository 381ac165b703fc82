"""Every knob of a ral_jax run, declared once with its default; `configs/video.py` and `configs/image.py` pick presets.

Presets (the `arg` of `get_config`, e.g. `--config=configs/video.py:grpo`):
  ''        the embedded default: tiny model, embedded tokenizer, synthetic tasks written into the workdir on
            first use, SFT warm-up then RAL (answer-only); about 3-5 minutes on a 2-core CPU; prints held-out
            accuracy and evidence mass before training, after SFT and after RL (README 'Training').
  paper     the paper's recipe on Qwen2.5-VL-7B (ral_jax/docs/method.md s.6): needs --config.model.hf_checkpoint=DIR and
            --config.data.train_manifest=Video-R1 JSON (and data.data_root).
  grpo      lambda_attn = 0 (the GRPO baseline).     ral        GRPO + lambda_attn * RAL (ral_jax/docs/method.md s.3).
  ral_zero  answer-only prompts, SFT targets without <think>, answer-only format reward (ral_jax/docs/method.md s.4).
  sft       supervised fine-tuning only.              distill    GRPO + mu * GKD + gamma_attn * attention
            distillation from a frozen teacher (ral_jax/docs/method.md s.5; Qwen2.5-VL-32B with `paper` sizes).
  tiny_X    the same recipe X on the tiny model with a few steps, for tests (e.g. `tiny_ral`, `tiny_distill`).
  testbed_X the perception testbed (README 'What RAL does'): the `small` model (~16M), hard synthetic tasks with
            distractors and evidence boxes (224 px images, 16-frame 112 px videos), answer-only responses;
            minutes on one GPU (ral_jax.experiments.compare runs its arms).
Overrides on the command line: `--config.rl.lambda_attn=5 --config.train.rl_steps=100`.
"""
from ml_collections import ConfigDict

from ral_jax.train.config import ALGOS


def base_config() -> ConfigDict:
  """All knobs with their defaults (the embedded default's values where a CPU demo needs small numbers)."""
  c = ConfigDict()
  c.seed = 0                   # seed of parameter init, data shuffling and rollout sampling
  c.algo = 'ral'               # one of ALGOS; selects the loss terms of the RL stage

  # ---- model -----------------------------------------------------------------------------------------
  c.model = ConfigDict()
  c.model.preset = 'tiny'      # models.config.PRESETS name; ignored for sizes when hf_checkpoint is set
  c.model.hf_checkpoint = ''   # local HF Qwen2.5-VL directory (config.json + safetensors); '' = random init
  c.model.init_checkpoint = '' # an Orbax checkpoint directory of a previous ral_jax run to start from
  c.model.dtype = ''           # compute dtype override ('' = the preset's): 'float32' | 'bfloat16'
  c.model.param_dtype = ''     # parameter storage dtype override ('' = the preset's)
  c.model.remat_policy = ''    # '' = the preset's; else one of models.config.REMAT_POLICIES
  c.model.attention_impl = ''  # '' = auto; else models.config.ATTENTION_IMPLS ('xla' | 'cudnn')
  c.model.scan_layers = True   # one lax.scan over the decoder layers (fast compile); False: unrolled loop
  c.model.record_layers = (-1,)  # the one decoder layer whose attention RAL trains (ral_jax/docs/method.md s.1)

  # ---- data (ral_jax/data: DataConfig, ProcessorConfig, VideoConfig, synthetic Knobs) -----------------------
  c.data = ConfigDict()
  c.data.source = 'synthetic'  # 'synthetic' (generated into <workdir>/synthetic on first use) | 'manifest'
  c.data.task = 'video'        # synthetic task family: 'video' (flash, motion) | 'image' (color, quadrant,
                               # count) | 'mixed' (all); or a comma list of data.synthetic TASKS
  c.data.num_train = 512       # synthetic training examples
  c.data.num_eval = 64         # synthetic held-out examples
  c.data.synthetic_seed = 0    # seed of the synthetic task generator
  c.data.image_size = 112      # synthetic image side (px)
  c.data.video_size = 56       # synthetic video frame side (px)
  c.data.video_frames = 8      # synthetic video frames (multiple of 8)
  c.data.object_size = 10      # synthetic object side (px)
  c.data.num_distractors = 3   # synthetic distractor objects per image / frame
  c.data.train_manifest = ''   # manifest(s) when source = 'manifest': Video-R1 JSON or JSONL, comma separated
  c.data.eval_manifest = ''    # held-out manifest(s) when source = 'manifest' ('' = no held-out evaluation)
  c.data.data_root = ''        # media paths in manifests are relative to this ('' = each manifest's directory)
  c.data.tokenizer = ''        # tokenizer directory; '' = the HF checkpoint's if any, else the embedded one
  c.data.prompt_buckets = (192, 256)   # prompt lengths Tp (left padded)
  c.data.patch_buckets = (64, 128)     # vision patches P per example (padded)
  c.data.target_buckets = (48, 64)     # SFT target lengths
  c.data.max_media = 1         # media items M per example (padded)
  c.data.image_min_pixels = 56 * 56  # images are resized (aspect kept) to at least this many pixels
  c.data.image_max_pixels = 112 * 112  # ... and at most this many
  c.data.video_min_pixels = 28 * 28  # per-frame pixel bounds of videos
  c.data.video_max_pixels = 56 * 56  # ... (max)
  c.data.fps = 2.0             # video sampling rate
  c.data.max_frames = 8        # most frames sampled from one video
  c.data.min_frames = 4        # fewest frames sampled from one video (short clips: all frames)
  c.data.num_workers = 0       # Grain worker processes (0 = in-process)
  c.data.read_threads = 2      # threads per process decoding records
  c.data.max_bad_fraction = 0.1  # stop when more than this fraction of records is bad

  # ---- rollout sampling (ral_jax/docs/method.md s.6: temperature 1.0) ----------------------------------------------
  c.sampling = ConfigDict()
  c.sampling.temperature = 1.0   # 0 = greedy decoding (log-probs of sampler and loss then at T = 1)
  c.sampling.top_p = 1.0       # nucleus sampling (1 = off)
  c.sampling.top_k = 0         # 0 = off
  c.sampling.max_new_tokens = 48   # response bucket Tr
  c.sampling.dtype = ''        # sampling compute dtype ('' = model dtype)

  # ---- RL objective (ral_jax/docs/method.md s.2-5) -------------------------------------------------------------------
  c.rl = ConfigDict()
  c.rl.prompts_per_batch = 8   # prompts per rollout batch (global); rollout batch = prompts_per_batch * G
  c.rl.group_size = 8          # G samples per prompt
  c.rl.num_minibatches = 4     # optimizer steps per rollout batch per epoch (ral_jax/docs/method.md s.3 default 4)
  c.rl.epochs = 1              # passes over each rollout batch
  c.rl.micro_batches = 1       # gradient accumulation: micro-batches per mini-batch
  c.rl.score_micro_batches = 0 # chunks of the scoring pass over the rollout batch (0 = rl.num_minibatches)
  c.rl.share_prompt = False    # scoring + update compute each prompt once for its G samples (exact; whole-group splits)
  c.rl.lr = 1e-5               # RL learning rate (peak)
  c.rl.lambda_attn = 1.0       # RAL weight (paper: 0.5, 1, 5)
  c.rl.beta = 0.04             # KL(pi_theta || pi_ref) weight
  c.rl.kl_estimator = 'k3'     # rl.config.KL_ESTIMATORS
  c.rl.clip_eps_low = 0.2      # PPO ratio clip: lower epsilon
  c.rl.clip_eps_high = 0.2     # PPO ratio clip: upper epsilon (> low: clip-higher)
  c.rl.dual_clip = 0.0         # 0 = off; else the dual-clip constant c > 1
  c.rl.aggregation = 'token_mean'  # rl.config.AGGREGATIONS
  c.rl.attn_aggregation = ''   # '' = same as aggregation
  c.rl.max_response_length = 0  # Dr.GRPO aggregation's constant length; 0 = the padded response length Tr
  c.rl.rows = 'response'       # rl.config.ROW_VARIANTS: the response tokens' own rows (paper) | 'producing'
  c.rl.advantage = 'grpo'      # rl.config.ADVANTAGE_ESTIMATORS
  c.rl.adv_eps = 1e-6          # added to the group std of rewards
  c.rl.reward = 'default'      # reward registry name (0.9 accuracy + 0.1 format)
  c.rl.accuracy_weight = 0.9   # reward = accuracy_weight * accuracy + format_weight * format
  c.rl.format_weight = 0.1     # weight of the format reward
  c.rl.format = 'think'        # 'think' (<think>..</think><answer>..</answer>) | 'answer_only' (RAL-zero)
  c.rl.logprob_chunk = 256     # response positions per log-prob chunk (the lm head never makes [B,T,V])
  c.rl.allow_single_update = True  # lambda_attn > 0 with one update per rollout: True warns, False is an error
  c.rl.attn_divergence = 'jsd' # RAL divergence: 'jsd' (paper) | 'kl' = KL(p_theta || p_old) (open question)
  c.rl.record_attention = False  # record the attention policy even when no loss term needs it (attn/* metrics,
                               # e.g. attn/evidence_mass for GRPO runs)
  c.rl.ral_grad_share = False  # log ral/grad_share = |grad of lambda_attn * L_RAL| / |grad of L| (extra backward)

  # ---- distillation (ral_jax/docs/method.md s.5) ---------------------------------------------------------------------
  c.distill = ConfigDict()
  c.distill.teacher_preset = 'tiny'  # teacher model preset when no teacher_checkpoint is given
  c.distill.teacher_checkpoint = ''   # HF directory of the teacher; '' = random init from teacher_seed
  c.distill.teacher_seed = 7   # init seed of a random teacher (tests)
  c.distill.mu = 1.0           # GKD weight
  c.distill.gamma_attn = 0.5   # attention-distillation weight (paper: 0.05, 0.5, 1)
  c.distill.kd_estimator = 'full'  # rl.config.KD_ESTIMATORS: exact reverse KL over the vocabulary | 'sampled'
  c.distill.attention = True   # False gives the "GRPO + GKD" baseline row
  c.distill.kd_aggregation = ''    # '' = the token loss's aggregation (rl.aggregation)
  c.distill.attn_aggregation = ''  # '' = the token loss's; 'seq_mean_token_sum' is the paper's Eq. 5 sum over t

  # ---- SFT (warm-up stage and the `sft` preset) ---------------------------------------------------------
  c.sft = ConfigDict()
  c.sft.batch_size = 8         # SFT examples per step (global)
  c.sft.lr = 5e-6              # SFT learning rate (peak)
  c.sft.micro_batches = 1      # gradient accumulation: micro-batches per SFT step

  # ---- optimizer (shared by both stages) -----------------------------------------------------------------
  c.optim = ConfigDict()
  c.optim.schedule = 'cosine'  # 'cosine' (warm-up + cosine to end_lr_ratio * lr) | 'constant' (warm-up + flat)
  c.optim.warmup_steps = 2     # in optimizer steps
  c.optim.end_lr_ratio = 0.1   # cosine schedule ends at this fraction of the peak lr
  c.optim.weight_decay = 0.0   # AdamW decoupled weight decay
  c.optim.b1 = 0.9             # Adam beta1
  c.optim.b2 = 0.999           # Adam beta2
  c.optim.eps = 1e-8           # Adam epsilon
  c.optim.grad_clip = 1.0      # global-norm clip; 0 = off
  c.optim.freeze = ('visual',)  # top-level parameter subtrees with no gradient and no optimizer state

  # ---- schedule of the run -------------------------------------------------------------------------------
  c.train = ConfigDict()
  c.train.sft_steps = 30       # SFT warm-up steps (outer steps); 0 = none
  c.train.rl_steps = 30        # RL steps (one rollout batch each); 0 = none
  c.train.log_every = 1        # write metrics every N outer steps
  c.train.eval_every = 0       # held-out accuracy every E outer steps (0 = only before, after SFT, after RL)
  c.train.eval_examples = 64   # held-out examples (greedy decoding)
  c.train.eval_batch = 32      # held-out prompts per evaluation batch (global)
  c.train.heatmap_every = 0    # attention heat maps of fixed held-out examples every E outer steps (0 = only
                               # before and after training); PNGs in <workdir>/attention, TensorBoard images
  c.train.heatmap_examples = 2 # held-out examples drawn (0 = no heat maps)
  c.train.export_hf = True     # write the final policy as an HF directory to <workdir>/hf_export
  c.train.stop_after = 0       # >0: stop (as if preempted) after this many outer steps; for tests
  c.train.eval_by_source = False  # held-out accuracy also per record data_source (eval/accuracy/<task>);
                               # single-process runs only (hosts see different tasks)
  c.train.max_skipped_updates = 8  # stop (without saving) after this many consecutive optimizer updates were
                               # skipped for a non-finite loss or gradient; 0 = never stop

  # ---- checkpoints ---------------------------------------------------------------------------------------
  c.checkpoint = ConfigDict()
  c.checkpoint.every = 10      # save every K outer steps (and at the end, and on SIGTERM)
  c.checkpoint.keep = 2        # keep the N most recent
  c.checkpoint.async_save = True  # save in a background thread (the next steps run meanwhile)

  # ---- device mesh ---------------------------------------------------------------------------------------
  c.mesh = ConfigDict()
  c.mesh.shape = (-1, 1, 1)    # ('data', 'fsdp', 'tensor'); one -1 takes the remaining devices

  c.mesh.rules = ()            # logical-axis rules ((name, mesh axes), ...); () = ral_jax.sharding defaults
  return c


def apply_algo(c: ConfigDict, algo: str) -> ConfigDict:
  """Sets the loss terms and prompt format of one recipe; sizes are left alone."""
  if algo not in ALGOS:
    raise ValueError(f'unknown algo {algo!r}; choose one of {ALGOS}')
  c.algo = algo
  if algo == 'grpo':
    c.rl.lambda_attn = 0.0
  elif algo == 'ral_zero':
    c.rl.format = 'answer_only'
  elif algo == 'sft':
    c.train.rl_steps = 0
  elif algo == 'distill':
    c.rl.lambda_attn = 0.0
  return c


def apply_tiny(c: ConfigDict) -> ConfigDict:
  """A few steps of the tiny model: the shape of a test run (seconds on CPU)."""
  c.model.preset = 'tiny'
  c.data.num_train = 16
  c.data.num_eval = 8
  c.data.prompt_buckets = (256,)
  c.data.patch_buckets = (64,)
  c.data.target_buckets = (64,)
  c.sampling.max_new_tokens = 12
  c.rl.prompts_per_batch = 2
  c.rl.group_size = 4
  c.rl.num_minibatches = 2
  c.rl.lr = 1e-3               # the tiny random model needs large steps to move measurably in 2 updates
  c.sft.batch_size = 4
  c.sft.lr = 2e-3
  c.optim.warmup_steps = 1
  c.train.sft_steps = 2 if c.algo in ('sft', 'ral', 'ral_zero') else 0
  c.train.rl_steps = 0 if c.algo == 'sft' else 2
  c.train.eval_examples = 4
  c.train.eval_batch = 4
  c.train.export_hf = False
  c.train.heatmap_examples = 0
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.distill.teacher_preset = 'tiny'
  c.mesh.shape = (2, 1, 1)     # a divisor of the 8 fake test devices; every tiny batch is even
  return c


def apply_paper(c: ConfigDict) -> ConfigDict:
  """Qwen2.5-VL-7B with the paper's recipe (ral_jax/docs/method.md s.6); sizes the paper leaves open use that
  page's defaults."""
  c.model.preset = 'qwen2_5_vl_7b'
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'nothing_saveable'
  c.data.source = 'manifest'
  c.data.prompt_buckets = (1024, 2048, 4096, 8192)
  c.data.patch_buckets = (4096, 8192, 20480)
  c.data.target_buckets = (512, 1024, 2048)
  c.data.image_min_pixels = 128 * 28 * 28
  c.data.image_max_pixels = 5120 * 28 * 28
  c.data.video_min_pixels = 4 * 28 * 28
  c.data.video_max_pixels = 128 * 28 * 28
  c.data.fps = 1.0
  c.data.max_frames = 128
  c.data.num_workers = 8
  c.sampling.max_new_tokens = 1024
  c.rl.prompts_per_batch = 64
  c.rl.group_size = 8
  c.rl.num_minibatches = 4
  # Micro-batches from the TPU compile (python -m ral_jax.aot --config=configs/video.py:paper --topology=v5p:2x2x2;
  # README 'Memory at scale'): 2 sequences per device per RL micro-batch, 4 per SFT micro-batch, 16 per scoring
  # chunk keep every stage under 68 GB per device over 8 devices (rl.micro_batches=4 peaks at 71 GB).
  c.rl.micro_batches = 8
  c.rl.score_micro_batches = 4
  c.sft.micro_batches = 2
  c.rl.lr = 1e-5
  c.sft.lr = 5e-6
  c.sft.batch_size = 64
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.01
  if c.algo == 'sft':          # stage 1: Video-R1-COT-165k, one epoch of 64-example batches
    c.train.sft_steps, c.train.rl_steps = 2580, 0
  else:                        # stage 2 is its own run, started from the stage-1 export (model.hf_checkpoint)
    c.train.sft_steps, c.train.rl_steps = 0, 800   # 51.2k prompts / 64 per batch, one epoch
  c.train.eval_every = 100
  c.train.eval_examples = 256
  c.train.eval_batch = 64
  c.checkpoint.every = 50
  c.checkpoint.keep = 3
  c.distill.teacher_preset = 'qwen2_5_vl_32b'
  c.mesh.shape = (1, -1, 1)
  return c


def apply_embedded_default(c: ConfigDict) -> ConfigDict:
  """The 3-5-minute 2-core-CPU demo: SFT warm-up then RAL on the synthetic video tasks, in the regime where the RL
  stage itself moves held-out accuracy (README 'What RAL does', "The embedded default"): answer-only responses, the
  vision tower trained, an SFT stage short enough that `flash` is often only partly learned, and RL that moves the
  policy enough per rollout batch (8 mini-batch updates at lr 2e-4, beta 0). The tiny random-init model needs far
  larger learning rates than the paper's 7B recipe."""
  c.seed = 1                   # at seed 0 SFT already solves `flash` and RL has nothing left to add (README table)
  c.rl.format = 'answer_only'  # '<answer>X</answer>': 7 response tokens, so 40 RL steps fit the CPU budget
  c.data.target_buckets = (8,)
  c.sampling.max_new_tokens = 8
  c.optim.freeze = ()          # SFT learns the perception in the vision tower too
  c.train.sft_steps = 180      # 1440 SFT examples (about 3 passes over the 512 synthetic training examples)
  c.train.rl_steps = 40        # 40 rollout batches of 8 prompts x G=8, 8 mini-batch updates each
  c.train.eval_by_source = True  # eval/accuracy/flash and eval/accuracy/motion in the metrics
  c.sft.lr = 2e-3
  c.rl.lr = 2e-4
  c.rl.num_minibatches = 8
  c.rl.beta = 0.0
  c.optim.warmup_steps = 10
  return c


def apply_testbed(c: ConfigDict) -> ConfigDict:
  """The perception testbed: `small` model, hard tasks where the evidence is a few of many visual tokens (a
  224 px image is 64 merged tokens, a 16-frame 112 px video 128), answer-only format (short responses, so RL
  steps are cheap), every run records the attention policy so attn/evidence_mass is logged for every arm."""
  c.model.preset = 'small'
  c.data.task = 'marked,color,blink,flash'
  c.data.num_train = 2048
  c.data.num_eval = 256
  c.data.image_size = 224
  c.data.object_size = 12
  c.data.num_distractors = 8
  c.data.video_size = 112
  c.data.video_frames = 16
  c.data.fps = 2.0
  c.data.max_frames = 16
  c.data.min_frames = 4
  c.data.image_min_pixels = c.data.image_max_pixels = 224 * 224
  c.data.video_min_pixels = c.data.video_max_pixels = 112 * 112
  c.data.prompt_buckets = (208, 288)   # image prompts are ~194 tokens (64 visual), video ~267 (128 visual)
  c.data.patch_buckets = (256, 512)
  c.data.target_buckets = (8,)         # '<answer>X</answer>' + end of turn = 7 tokens
  c.data.read_threads = 8
  c.sampling.max_new_tokens = 8
  c.rl.format = 'answer_only'
  c.rl.prompts_per_batch = 16
  c.rl.group_size = 8
  c.rl.num_minibatches = 4
  c.rl.lr = 2e-5
  c.rl.beta = 0.0
  c.rl.record_attention = True
  c.rl.ral_grad_share = True
  c.sft.batch_size = 32
  c.sft.lr = 1e-3
  c.optim.warmup_steps = 5
  c.optim.schedule = 'constant'
  c.train.sft_steps = 60
  c.train.rl_steps = 40
  c.train.eval_every = 10
  c.train.eval_examples = 256
  c.train.eval_batch = 64
  c.train.eval_by_source = True
  c.train.export_hf = False
  c.train.heatmap_examples = 0
  c.checkpoint.every = 1000
  c.checkpoint.async_save = False
  return c


def get_config_for(task: str, arg: str = '') -> ConfigDict:
  """Builds the config of preset `arg` ('' | X | tiny_X | paper_X; X in ALGOS) for synthetic task family `task`."""
  c = base_config()
  c.data.task = task
  arg = (arg or '').strip()
  tiny = arg.startswith('tiny')
  paper = arg.startswith('paper')
  testbed = arg.startswith('testbed')
  family = tiny or paper or testbed
  algo = arg.split('_', 1)[1] if family and '_' in arg else ('' if family else arg)
  algo = algo or 'ral'
  if algo not in ALGOS:
    raise ValueError(f'unknown preset {arg!r}; choose one of: "" (embedded default), paper, tiny, testbed, '
                     f'{", ".join(ALGOS)}, tiny_<algo>, paper_<algo>, testbed_<algo>')
  c.algo = algo
  if tiny:
    apply_tiny(c)
  elif paper:
    apply_paper(c)
  elif testbed:
    apply_testbed(c)
  else:
    apply_embedded_default(c)
  return apply_algo(c, algo)
