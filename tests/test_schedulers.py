"""Per-sample schedulers against the stock diffusers schedulers run one sample at a time."""
import pytest
import torch
from diffusers import PNDMScheduler

from rpo.cli import UserError
from rpo.diffusion.schedulers import SCHEDULERS, PerSampleScheduler, make_timesteps, stock_scheduler
from rpo.tiny.pipelines import SD15_SCHEDULER

SHAPE = (4, 8, 8)


def fake_model(x, t):
    """A fixed linear function of x and t: the output depends on the whole trajectory."""
    pattern = torch.linspace(-1, 1, x[0].numel()).view(1, *x.shape[1:])
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *[1] * (x.dim() - 1))
    return 0.6 * x + 0.4 * (t / 1000) * pattern - 0.1 * x.flip(-1)


def noise_for(i, k):
    """Step k's DDPM noise for sample i: what the stock scheduler draws from a generator seeded this way."""
    return torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(1000 * i + k))


def run_batched(name, config, grid, x_T):
    scheduler = PerSampleScheduler.from_name(name, config)
    scheduler.set_timesteps(grid)
    x, xs = x_T, []
    for k in range(grid.shape[1]):
        noise = torch.cat([noise_for(i, k) for i in range(len(x))])
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, k), grid[:, k]), k, x, noise=noise)
        xs.append(x)
    return torch.stack(xs, dim=1)  # (B, T, C, H, W): x after every step


def run_stock(name, config, row, x_T, i, own_grid=False):
    """Sample i alone through the stock diffusers scheduler on its own timesteps `row`."""
    scheduler = stock_scheduler(name, config)
    T = len(row)
    if own_grid:
        scheduler.set_timesteps(T)
        assert scheduler.timesteps.tolist() == row.tolist()
    elif name == "DDIM":
        # Stock DDIM takes no custom grid and steps to t - num_train // T: on these grids that is
        # the next entry of the row (checked here), and below the last entry it uses final_alpha_cumprod.
        scheduler.set_timesteps(T)
        ratio = scheduler.config.num_train_timesteps // T
        assert (row[:-1] - row[1:] == ratio).all() and row[-1] < ratio
        scheduler.timesteps = row.clone()
    else:
        scheduler.set_timesteps(timesteps=row.tolist())
    x, xs = x_T[i:i + 1], []
    for k, t in enumerate(row.tolist()):
        kwargs = {"generator": torch.Generator().manual_seed(1000 * i + k)} if name == "DDPM" else {}
        x = scheduler.step(fake_model(x, t), t, x, **kwargs).prev_sample
        xs.append(x[0])
    return torch.stack(xs)


def config_for(prediction_type):
    return dict(SD15_SCHEDULER, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [20, 7])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_sample_matches_the_stock_scheduler_on_its_own_grid(name, num_steps, prediction_type):
    config = config_for(prediction_type)
    for seed in range(3):
        grid = make_timesteps(name, config, num_steps, 5, perturb=True, generator=torch.Generator().manual_seed(seed))
        assert len(set(grid[:, -1].tolist())) > 1  # the rows really differ
        x_T = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(100 + seed))
        batched = run_batched(name, config, grid, x_T)
        for i in range(5):
            stock = run_stock(name, config, grid[i], x_T, i)
            assert (batched[i] - stock).abs().max() <= 1e-5, (seed, i)


@pytest.mark.parametrize("name, overrides", [
    ("DPMSolver++", dict(final_sigmas_type="sigma_min")),  # 2nd order on the last step unless < 15 steps
    ("DPMSolver++", dict(final_sigmas_type="sigma_min", euler_at_final=True)),
    ("DPMSolver++", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("DPMSolver++", dict(solver_type="heun")),
    ("DPMSolver++", dict(solver_order=1)),
    ("DDPM", dict(variance_type="fixed_large", clip_sample=True)),
    ("DDIM", dict(clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=True)),
    ("DDPM", dict(prediction_type="sample")),
])
@pytest.mark.parametrize("num_steps", [20, 7])
def test_configured_variants_match_the_stock_scheduler(name, overrides, num_steps):
    config = dict(SD15_SCHEDULER, **overrides)
    grid = make_timesteps(name, config, num_steps, 4, perturb=True, generator=torch.Generator().manual_seed(11))
    x_T = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(11))
    batched = run_batched(name, config, grid, x_T)
    for i in range(4):
        assert (batched[i] - run_stock(name, config, grid[i], x_T, i)).abs().max() <= 1e-5


@pytest.mark.parametrize("num_steps", [20, 7])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_unperturbed_grid_is_the_stock_grid_and_runs_like_stock(name, num_steps):
    config = PNDMScheduler.from_config(SD15_SCHEDULER).config  # as a loaded SD1.5 pipeline holds it
    grid = make_timesteps(name, config, num_steps, 3, perturb=False)
    stock = stock_scheduler(name, config)
    stock.set_timesteps(num_steps)
    assert grid.dtype == torch.int64 and grid.shape == (3, num_steps)
    assert all(row.tolist() == stock.timesteps.tolist() for row in grid)
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(7))
    batched = run_batched(name, config, grid, x_T)
    for i in range(3):
        assert (batched[i] - run_stock(name, config, grid[i], x_T, i, own_grid=True)).abs().max() <= 1e-5


@pytest.mark.parametrize("num_steps", [20, 7, 1])
def test_perturbed_grid_layout(num_steps):
    grid = make_timesteps("DPMSolver++", SD15_SCHEDULER, num_steps, 64, perturb=True,
                          generator=torch.Generator().manual_seed(0))
    ratio = 1000 // num_steps
    offsets = grid[:, -1]
    assert grid.dtype == torch.int64 and grid.shape == (64, num_steps)
    assert (grid >= 0).all() and (grid < 1000).all()
    assert (grid[:, 1:] < grid[:, :-1]).all()
    assert (offsets >= 0).all() and (offsets < ratio).all()
    assert len(set(offsets.tolist())) > 10
    k = torch.arange(num_steps)
    assert torch.equal(grid, ratio * (num_steps - 1 - k) + offsets[:, None])
    again = make_timesteps("DPMSolver++", SD15_SCHEDULER, num_steps, 64, perturb=True,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(grid, again)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_sample_uses_its_own_noise_levels_not_sample_0s(name):
    # The paper's code (basiclab/DiffusionDRO) steps every sample of a DPM-Solver++ batch with sample 0's sigmas. Here,
    # sample 1 on its own grid must differ from sample 1 run on sample 0's grid.
    base = 50 * torch.arange(19, -1, -1)
    own = torch.stack([base + 3, base + 41])
    on_sample_0s = torch.stack([base + 3, base + 3])
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    mine = run_batched(name, SD15_SCHEDULER, own, x_T)
    wrong = run_batched(name, SD15_SCHEDULER, on_sample_0s, x_T)
    assert torch.equal(mine[0], wrong[0])  # sample 0 is unaffected by its neighbour
    assert (mine[1] - wrong[1]).abs().max() > 1e-2
    assert (mine[1] - run_stock(name, SD15_SCHEDULER, own[1], x_T, 1)).abs().max() <= 1e-5


def test_dpm_solver_history_is_per_sample():
    # Sample 1's second-order update must use sample 1's previous x0 prediction: the batch result
    # equals running each sample in its own batch of one.
    grid = make_timesteps("DPMSolver++", SD15_SCHEDULER, 20, 4, perturb=True,
                          generator=torch.Generator().manual_seed(3))
    x_T = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    together = run_batched("DPMSolver++", SD15_SCHEDULER, grid, x_T)
    for i in range(4):
        alone = run_batched("DPMSolver++", SD15_SCHEDULER, grid[i:i + 1], x_T[i:i + 1])
        assert (together[i] - alone[0]).abs().max() <= 1e-6


def test_ddpm_draws_noise_from_the_generator():
    grid = make_timesteps("DDPM", SD15_SCHEDULER, 20, 2, perturb=True, generator=torch.Generator().manual_seed(0))
    scheduler = PerSampleScheduler.from_name("DDPM", SD15_SCHEDULER)
    scheduler.set_timesteps(grid)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    eps = fake_model(x, grid[:, 0])
    a = scheduler.step(eps, 0, x, generator=torch.Generator().manual_seed(5))
    b = scheduler.step(eps, 0, x, generator=torch.Generator().manual_seed(5))
    c = scheduler.step(eps, 0, x, noise=torch.zeros_like(x))
    expected_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert torch.allclose(a, scheduler.step(eps, 0, x, noise=expected_noise), atol=1e-6)


def test_dtype_is_kept_and_step_order_is_checked():
    grid = make_timesteps("DPMSolver++", SD15_SCHEDULER, 5, 2, perturb=True, generator=torch.Generator().manual_seed(0))
    scheduler = PerSampleScheduler.from_name("DPMSolver++", SD15_SCHEDULER)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(2, *SHAPE), 0, torch.zeros(2, *SHAPE))
    scheduler.set_timesteps(grid)
    x = torch.randn(2, *SHAPE).to(torch.bfloat16)
    assert scheduler.step(fake_model(x.float(), grid[:, 0]).bfloat16(), 0, x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="k = 1"):
        scheduler.step(x, 3, x)
    with pytest.raises(ValueError, match="0..4"):
        scheduler.step(x, 5, x)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([950, 900, 850]), "2-D"),
    (torch.tensor([[10, 20, 30]]), "row 0 has 10 at step 0 then 20"),
    (torch.tensor([[900, 500, 500]]), "strictly decrease"),
    (torch.tensor([[1000, 500, 0]]), r"\[0, 1000\)"),
    (torch.tensor([[900, 500, -1]]), "from -1 to 900"),
    (torch.tensor([[900.0, 500.0]]), "integers"),
    (torch.zeros(2, 0, dtype=torch.int64), "non-empty"),
])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_bad_grids_raise(name, bad, message):
    scheduler = PerSampleScheduler.from_name(name, SD15_SCHEDULER)
    with pytest.raises(ValueError, match=message):
        scheduler.set_timesteps(bad)


def test_unknown_names_and_unsupported_configs_raise_user_errors():
    with pytest.raises(UserError, match="unknown scheduler 'Euler'.*DDPM, DDIM, DPMSolver\\+\\+"):
        PerSampleScheduler.from_name("Euler", SD15_SCHEDULER)
    with pytest.raises(UserError, match="unknown scheduler"):
        make_timesteps("PNDM", SD15_SCHEDULER, 20, 2, perturb=False)
    with pytest.raises(UserError, match="between 1 and 1000"):
        make_timesteps("DDPM", SD15_SCHEDULER, 0, 2, perturb=True)
    with pytest.raises(UserError, match="solver_order=3"):
        PerSampleScheduler.from_name("DPMSolver++", dict(SD15_SCHEDULER, solver_order=3))
    with pytest.raises(UserError, match="use_karras_sigmas"):
        PerSampleScheduler.from_name("DPMSolver++", dict(SD15_SCHEDULER, use_karras_sigmas=True))
