"""Every configuration key of cmjax, once, with its default and meaning. Recipes start from here.

  python -m cmjax.main --config=configs/default.py --workdir=/tmp/cmjax_default

The defaults train iCT on the embedded digits dataset (8×8, no download) with a small ADM UNet.
`config.model` holds exactly the fields of the network `config.model.name` selects (`cmjax/models/`).
`config.method.name` selects the objective; each objective's settings live in its own section
`config.method.<name>` (`cmjax.losses.objective_settings(name)` lists them with the objective's defaults), so
`--config.method.name=edm|cd|ct|ict|ect|sct|scd|meanflow|fm` switches any recipe to that method with these defaults.
The teacher (CD, ECT) and the LPIPS weights are files, not objective settings: `config.teacher`,
`config.distance_weights`.

Configs import only ml_collections: parsing one starts neither JAX nor TensorFlow.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0  # model init, noise and data order all derive from it
    # The PRNG of the train step's noise and dropout keys (jax.random.key(seed, impl=...)): "threefry2x32" (JAX's
    # default; the same numbers on every mesh) or "rbg" / "unsafe_rbg" (XLA's RngBitGenerator: far fewer
    # ops per random bit, the numbers depend on the backend). docs/performance.md measures the difference.
    config.rng_impl = "threefry2x32"
    # JAX's persistent compilation cache: "workdir" (WORKDIR/jax_cache, local or gs://), a directory, or "" (off).
    # A restarted run loads its compiled step and samplers from it; JAX_COMPILATION_CACHE_DIR, if set, wins.
    config.compilation_cache_dir = "workdir"
    config.batch_size = 128  # global, over all processes and devices
    config.total_steps = 3000  # optimizer steps; also K of the curricula (iCT, CT)
    config.log_every = 50  # steps between metric writes (TensorBoard, metrics.jsonl) and progress lines
    config.ckpt_every = 500  # steps between asynchronous checkpoints
    config.keep_checkpoints = 3  # newest checkpoints kept
    # Resume from this checkpoint step instead of the newest (-1: the newest). The checkpoints after it are
    # moved to workdir/checkpoints_set_aside/ (not deleted); applied once, so a restart with the same command
    # resumes from the newest again. See docs/troubleshooting.md.
    config.restore_step = -1
    # The newest checkpoint cannot be read back: False stops with a message naming it and the intact ones;
    # True resumes from the newest readable one with a warning and a "checkpoint_skipped" row in metrics.jsonl.
    config.restore_fallback = False
    config.eval_every = 1000  # steps between sample grids and quality metrics (0: only at the end)
    config.max_nonfinite_steps = 20  # consecutive skipped non-finite steps before training stops
    config.ema_rates = (0.999,)  # evaluation EMA rates of the parameters (iCT CIFAR-10: 0.99993)

    # Device mesh: batch over ("data", "fsdp"); parameters FSDP-sharded over "fsdp". -1 fills.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1

    # Input (cmjax/data/pipeline.py; its DEFAULTS hold the same values, tested).
    config.data = ml_collections.ConfigDict()
    # digits | cifar10 | imagenet64 | imagenet256 | lsun_bedroom | lsun_cat, or the latent datasets digits_latents |
    # imagenet256_latents that --mode=encode writes (cmjax/data/datasets.py, docs/latents.md)
    config.data.name = "digits"
    config.data.split = "train"  # TFDS split, slicing allowed ("train[:90%]")
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir; None: TFDS's default
    config.data.shuffle_buffer = 10_000  # examples per process in the shuffle buffer; 0: file order
    config.data.random_flip = True  # mirror each image left-right with probability 1/2
    config.data.cache = False  # keep the decoded split in host memory (small datasets only)
    config.data.prefetch = 2  # batches tf.data prepares ahead of the train step
    config.data.ram_budget_gb = 4.0  # cap on tf.data's autotuned buffers, per process

    # Latent datasets (cmjax/data/latents.py, docs/latents.md): --mode=encode writes them; training reads the
    # latents; sampling and evaluation decode samples to pixels with the VAE.
    config.latent = ml_collections.ConfigDict()
    # A diffusers AutoencoderKL folder (the SD-VAE: sd-vae-ft-ema / ft-mse, once downloaded). --mode=encode needs it;
    # "" elsewhere = the VAE the latent dataset records (a different one is refused).
    config.latent.vae = ""
    config.latent.batch_size = 256  # --mode=encode: global images per encode step (a multiple of the device count)
    config.latent.chunk_size = 10_000  # --mode=encode: images per chunk file, the unit a restarted encode resumes at

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"  # unet | ncsnpp | mlp
    config.model.image_size = 8
    config.model.in_channels = 1
    config.model.out_channels = 1
    config.model.model_channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (4,)  # image resolutions that get self-attention
    config.model.num_head_channels = 32
    config.model.use_scale_shift_norm = True
    config.model.resblock_updown = False
    config.model.dropout = 0.1
    config.model.num_classes = 0  # 0: unconditional
    config.model.dtype = "float32"  # compute dtype; parameters stay float32 (bfloat16 on TPU)
    config.model.remat = False  # rematerialise each block in the backward pass (saves memory, costs FLOPs)
    # xla | cudnn (GPU) | flash (Pallas kernel with a fused JVP pass; cmjax/models/attention.py, docs/performance.md)
    config.model.attention_impl = "xla"
    # sCM's log-variance head w(t) (every network; read only by sCT/sCD's adaptive weightings); False: none.
    config.model.logvar_head = False
    # Class-conditional networks: labels replaced by the null label in training (classifier-free guidance).
    config.model.label_dropout = 0.0
    config.model.velocity_head = False  # iMF's auxiliary v-head (MLP, UNet); adds iMF's v-loss to MeanFlow
    config.model.null_label = False  # one more label row, "no class" (MeanFlow's guidance and label dropout)

    config.method = ml_collections.ConfigDict()
    config.method.name = "ict"  # edm | cd | ct | ict | ect | sct | scd | meanflow (cmjax/methods.py, losses.py)
    # Shared by the sections below: σ range of the Karras grids, σ_data, ρ (DESIGN §4).
    sigma_min, sigma_max, sigma_data, rho = 0.002, 80.0, 0.5, 7.0

    # EDM denoising score matching: ln σ ~ N(p_mean, p_std²) (EDM eq. 2, 8).
    config.method.edm = ml_collections.ConfigDict()
    config.method.edm.sigma_data = sigma_data
    config.method.edm.p_mean = -1.2
    config.method.edm.p_std = 1.2
    # edm: time input 250·ln σ | trigflow: t = arctan(σ/σd), sCM's TrigFlow diffusion teacher (an sCD student
    # can start from it: --config.teacher.init_student=True with sCD's parameterization_kind "trigflow")
    config.method.edm.parameterization_kind = "edm"

    # CD (CM 2023 eq. 7): one teacher ODE step from σ_{n+1} to σ_n on an N-point Karras grid.
    config.method.cd = ml_collections.ConfigDict()
    config.method.cd.teacher_solver = "heun"  # heun | euler
    config.method.cd.curriculum = "fixed"  # fixed (N = num_scales, μ = target_ema) | cm_adaptive (s0, s1, μ0)
    config.method.cd.num_scales = 18
    config.method.cd.s0 = 2
    config.method.cd.s1 = 150
    config.method.cd.mu0 = 0.9
    config.method.cd.target_ema = 0.0  # μ of the target network θ⁻ (CIFAR-10: 0; ImageNet-64/LSUN: 0.95)
    config.method.cd.distance = "l2"  # l2 | l1 | pseudo_huber | lpips | lpips_avgpool (cmjax/distances.py)
    config.method.cd.huber_c = ml_collections.config_dict.placeholder(float)  # None: iCT's 0.00054·√d
    config.method.cd.weighting = "uniform"  # uniform | karras (1/σ² + 1/σd²) | ict (1/Δσ)
    config.method.cd.sigma_min = sigma_min
    config.method.cd.sigma_max = sigma_max
    config.method.cd.sigma_data = sigma_data
    config.method.cd.rho = rho

    # CT (CM 2023 eq. 10): x̂_n = x + σ_n·z; adaptive curriculum N(k), μ(k) of the released code.
    config.method.ct = ml_collections.ConfigDict()
    config.method.ct.curriculum = "cm_adaptive"  # cm_adaptive | fixed
    config.method.ct.num_scales = 18  # N of the fixed curriculum
    config.method.ct.s0 = 2
    config.method.ct.s1 = 150
    config.method.ct.mu0 = 0.9
    config.method.ct.target_ema = 0.0  # μ of the fixed curriculum
    config.method.ct.distance = "l2"
    config.method.ct.huber_c = ml_collections.config_dict.placeholder(float)
    config.method.ct.weighting = "uniform"
    config.method.ct.sigma_min = sigma_min
    config.method.ct.sigma_max = sigma_max
    config.method.ct.sigma_data = sigma_data
    config.method.ct.rho = rho

    # iCT (Song & Dhariwal 2023): doubling curriculum s0 → s1, lognormal pair indices, pseudo-Huber, 1/Δσ.
    config.method.ict = ml_collections.ConfigDict()
    config.method.ict.s0 = 10
    config.method.ict.s1 = 160  # sized for a few thousand steps: N = 11, 21, 41, 81, 161 (CIFAR-10: 1280)
    config.method.ict.p_mean = -1.1
    config.method.ict.p_std = 2.0
    config.method.ict.distance = "pseudo_huber"
    config.method.ict.huber_c = ml_collections.config_dict.placeholder(float)  # None: 0.00054·√d
    config.method.ict.weighting = "ict"
    config.method.ict.sigma_min = sigma_min
    config.method.ict.sigma_max = sigma_max
    config.method.ict.sigma_data = sigma_data
    config.method.ict.rho = rho

    # ECT (Geng et al. 2024): t lognormal, r = ECT's r(t) at stage ⌊step/stage_steps⌋, w = 1/(t − r).
    config.method.ect = ml_collections.ConfigDict()
    config.method.ect.p_mean = -1.1
    config.method.ect.p_std = 2.0
    config.method.ect.q = 2.0
    config.method.ect.k = 8.0
    config.method.ect.b = 1.0
    config.method.ect.stage_steps = 25_000  # iterations per halving of Δt (CIFAR-10: d = 25k)
    config.method.ect.huber_c = 0.0  # pseudo-Huber c (CIFAR-10: 0, the L2 norm)
    config.method.ect.parameterization_kind = "edm"  # edm (the EDM model ECT starts from) | consistency
    config.method.ect.sigma_min = sigma_min
    config.method.ect.sigma_data = sigma_data

    # sCT / sCD (Lu & Song 2024, sCM): TrigFlow, t = arctan(e^τ/σd) with τ ~ N(p_mean, p_std²), tangent
    # g = −cos²t·(σd·F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σd·dF⁻/dt) normalised g/(‖g‖ + c). Defaults are
    # FastGen's CIFAR-10 `config_scm.py` (the paper's appendix was not read).
    # sCT: dx_t/dt = cos t·z − sin t·x0.
    config.method.sct = ml_collections.ConfigDict()
    config.method.sct.p_mean = -1.0  # time proposal τ ~ N(p_mean, p_std²) (ImageNet-64 sCD: −1.0 / 1.6)
    config.method.sct.p_std = 1.4
    config.method.sct.sigma_data = sigma_data
    config.method.sct.tangent_warmup_steps = 10_000  # r = min(1, step / this); 0: r = 1 throughout
    config.method.sct.tangent_norm_c = 0.1  # c of g/(‖g‖ + c)
    config.method.sct.tangent_norm = "rms"  # rms: ‖g‖/√D (FastGen's spatial invariance) | l2: plain ‖g‖
    # none | prior (1/σ) | adaptive (sCM's learned e^{w}/D·‖·‖² − w; needs config.model.logvar_head) |
    # adaptive_prior (both: FastGen's default)
    config.method.sct.weighting = "none"
    config.method.sct.jvp_mode = "exact"  # exact (jax.jvp) | finite_difference (central, step jvp_fd_step)
    config.method.sct.jvp_fd_step = 1e-3  # 1e-4 for trigflow_edm (cmjax/jvp.py)
    # trigflow: c_noise(t) = t (stable) | trigflow_edm: EDM's 250·ln σ (reads EDM weights exactly; unstable here)
    config.method.sct.parameterization_kind = "trigflow"
    # sCD: dx_t/dt = σd·F_teacher (the EDM teacher read as TrigFlow, exact); the student starts from fresh weights.
    config.method.scd = ml_collections.ConfigDict()
    config.method.scd.p_mean = -1.0  # time proposal τ ~ N(p_mean, p_std²) (ImageNet-64 sCD: −1.0 / 1.6)
    config.method.scd.p_std = 1.4
    config.method.scd.sigma_data = sigma_data
    config.method.scd.tangent_warmup_steps = 10_000  # r = min(1, step / this); 0: r = 1 throughout
    config.method.scd.tangent_norm_c = 0.1  # c of g/(‖g‖ + c)
    config.method.scd.tangent_norm = "rms"  # rms: ‖g‖/√D (FastGen's spatial invariance) | l2: plain ‖g‖
    config.method.scd.weighting = "none"  # as sct's
    config.method.scd.jvp_mode = "exact"  # exact (jax.jvp) | finite_difference (central, step jvp_fd_step)
    config.method.scd.jvp_fd_step = 1e-3  # 1e-4 for trigflow_edm (cmjax/jvp.py)
    # trigflow: c_noise(t) = t (stable) | trigflow_edm: EDM's 250·ln σ (reads EDM weights exactly; unstable here)
    config.method.scd.parameterization_kind = "trigflow"
    # Classifier-free guidance of a class-conditional teacher: v_u + s·(v_c − v_u), v_u from the null label; 1: off
    config.method.scd.guidance_scale = 1.0

    # MeanFlow / improved MeanFlow (Geng et al. 2025; cmjax.losses.meanflow_loss): z = (1 − t)·x + t·ε, the network
    # is the average velocity u(z, r, t) conditioned on (t, t − r); target u_tgt = v − (t − r)·du/dt from one JVP
    # along (v, 0, 1). Defaults: the ImageNet JAX release (Gsunshine/meanflow configs/default.py:52-71).
    config.method.meanflow = ml_collections.ConfigDict()
    config.method.meanflow.time_dist = "logit_normal"  # logit_normal: t = sigmoid(p_mean + p_std·n) | uniform
    config.method.meanflow.p_mean_t = -0.4
    config.method.meanflow.p_std_t = 1.0
    config.method.meanflow.p_mean_r = -0.4  # r's own draw (CIFAR-10: −2.0 / 2.0, the paper's; v1: −4.0 / 1.6)
    config.method.meanflow.p_std_r = 1.0
    config.method.meanflow.equal_fraction = 0.75  # fraction of samples with r = t (CIFAR-10: 0.25; iMF: 0.5)
    config.method.meanflow.tr_order = "sort"  # sort: t, r = max, min, the paper's | min: r = min(t, r) (v1)
    config.method.meanflow.norm_p = 1.0  # adaptive weight sg(1/(‖Δ‖² + norm_eps)^norm_p) (CIFAR-10: p = 0.75)
    config.method.meanflow.norm_eps = 0.01  # (CIFAR-10 PyTorch release: 1e-3)
    config.method.meanflow.tangent = "sample"  # sample: JVP along v = ε − x (MeanFlow) | predicted: u_θ(z, t, t) (iMF)
    # Class-conditional models (config.model.num_classes > 0, config.model.null_label = True):
    # none | cfg: ω, κ folded into the target on [t_start, t_end] (MeanFlow) | conditioned: ω and an interval
    # drawn per sample and fed to the network (iMF §5; ω ∈ [1, 1 + cfg_max], power law cfg_beta)
    config.method.meanflow.guidance = "none"
    config.method.meanflow.omega = 1.0
    config.method.meanflow.kappa = 0.5
    config.method.meanflow.t_start = 0.0
    config.method.meanflow.t_end = 1.0
    config.method.meanflow.cfg_max = 7.0
    config.method.meanflow.cfg_beta = 1.0
    config.method.meanflow.class_dropout = 0.1  # labels dropped to "no class" with this probability
    config.method.meanflow.jvp_mode = "exact"  # exact (jax.jvp) | finite_difference (central, step jvp_fd_step)
    config.method.meanflow.jvp_fd_step = 1e-3

    # Flow matching, SiT's objective (Ma et al. 2024; cmjax.losses.fm_loss): x_t = t·x1 + (1 − t)·x0 (t = 0 noise,
    # t = 1 data), loss mean (v_θ(x_t, t) − (x1 − x0))². Defaults: SiT's Linear velocity model (willisma/SiT
    # transport/__init__.py:53-55, transport/transport.py:103-140). Labels are dropped by the network
    # (config.model.label_dropout, SiT's class_dropout_prob 0.1), not here.
    config.method.fm = ml_collections.ConfigDict()
    config.method.fm.time_distribution = "uniform"  # uniform: SiT's t ~ U | logit_normal: 1 − t = sigmoid(Pm + Ps·n)
    config.method.fm.p_mean = 0.0  # logit_normal only (cmjax's option; SiT has none)
    config.method.fm.p_std = 1.0
    config.method.fm.train_eps = 0.0  # t ∈ [eps, 1 − eps]; SiT's velocity model: 0 (1e-3 is its score/noise models')

    # The teacher of CD and ECT: an EDM run's workdir (its config.json and newest checkpoint).
    config.teacher = ml_collections.ConfigDict()
    config.teacher.workdir = ""
    config.teacher.ema_rate = ""  # the teacher's EMA copy: "" = the teacher run's first rate, or e.g. "0.9999"
    # Start the student (online network, target θ⁻ and every EMA copy) from the teacher's weights. None: the
    # method's fact (cmjax/methods.py: CD and ECT do, as their releases; others start fresh); True also makes
    # CT start from config.teacher.workdir (the CM release's ImageNet-64/LSUN CT command); False: fresh init.
    config.teacher.init_student = ml_collections.config_dict.placeholder(bool)
    # What the student's online network (and target) starts as: "ema" = the teacher's EMA copy above (openai's
    # ImageNet-64/LSUN release, which has only that file; ECT) | "online" = the teacher's online parameters (the
    # CIFAR-10 JAX release's finetune). The student's EMA copies always start from the teacher's EMA copy.
    config.teacher.init_online_from = "ema"

    # LPIPS distances: the converted VGG16 weights (.npz); "" = ~/.cache/cmjax/lpips_vgg16.npz, written by
    # `python -m cmjax.metrics.lpips --convert` (docs/lpips.md).
    config.distance_weights = ""

    # Optimizer (cmjax/optim.py; its default_config() holds the same values, tested).
    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "radam"  # adam | radam | adamw
    config.optim.learning_rate = 1e-4  # peak learning rate, reached after warmup
    config.optim.b1 = 0.9  # first-moment decay
    config.optim.b2 = 0.999  # second-moment decay
    config.optim.eps = 1e-8  # added to the root of the second moment
    config.optim.weight_decay = 0.0  # decoupled weight decay, multiplied by the learning rate; adamw only
    config.optim.warmup_steps = 0  # linear ramp of the learning rate from 0 to peak over this many updates
    # constant | inverse_sqrt: peak / sqrt(max(step / decay_start_step, 1)) | cosine: from peak at the end of
    # warmup to 0 at total_steps (short runs: the last, small steps sharpen 1-step samples; configs/digits.py)
    config.optim.decay = "constant"
    config.optim.decay_start_step = 0  # updates before inverse_sqrt decay starts (EDM2's ref_batches)
    config.optim.grad_clip_norm = 0.0  # clip gradients to this global L2 norm before the moments; 0 = off

    config.sample = ml_collections.ConfigDict()
    config.sample.num_images = 64  # images in each sample grid
    config.sample.two_step_sigma = 0.8  # the second noise level of the 2-step sampler
    config.sample.two_step_time = 0.5  # MeanFlow's 2-step sampler: 1 → two_step_time → 0 (iMF's linspace midpoint)
    # iMF networks (config.method.meanflow.guidance = "conditioned") are told the CFG scale ω and its interval
    config.sample.guidance_scale = 1.0
    config.sample.guidance_interval = (0.0, 1.0)
    # Samples in [−1, 1] → uint8 (grids, .npz, FID): round | floor (the CM releases truncate: openai's
    # image_sample.py, the CIFAR-10 JAX evaluate.py; ECT rounds half up).
    config.sample.quantize = "round"
    config.sample.metric_samples = 512  # samples per sampler for the digits quality metric (0: none)

    # Evaluation (cmjax/evaluate.py): --mode=eval, and FID during training.
    config.eval = ml_collections.ConfigDict()
    config.eval.num_samples = 50_000  # samples per sampler and EMA rate for --mode=eval (published FIDs: 50k)
    config.eval.batch_size = 512  # global images per chunk (a multiple of the device count); unit of resumption
    config.eval.metric = "auto"  # auto (digits: the digit classifier; others: inception) | inception | digits
    # python -m cmjax.metrics.inception writes these weights
    config.eval.inception_weights = "~/.cache/cmjax/pt_inception-2015-12-05-6726825d.npz"
    config.eval.inception_size = 299  # Inception input size; pytorch-fid's 299 (smaller, >= 75, only for tests)
    # How images reach the Inception (docs/evaluation.md): tf_legacy = the 2015 TF graph's own ResizeBilinear
    # (TF1, no half-pixel offset) and (x − 128)/128, as the ADM evaluator (CM ImageNet-64/LSUN) and clean-fid's
    # legacy_tensorflow (CM CIFAR-10, ECT) feed it: the published tables' protocol | pytorch_fid =
    # F.interpolate(align_corners=False) half-pixel resize and 2x − 1 (pytorch-fid).
    config.eval.fid_protocol = "tf_legacy"
    config.eval.reference = "train"  # TFDS split of config.data.name (statistics cached), or a .npz of mu, sigma
    config.eval.fid_during_training = 0  # samples per sampler for FID/IS/precision/recall each eval_every (0: off)
    config.eval.two_step_search = 0  # samples per probe of the 2-step middle-time ternary search (0: off)
    config.eval.search_steps = 40  # Karras grid (openai --steps) whose indices the 2-step search walks
    return config
