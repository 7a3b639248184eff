"""A suite's env built as a config block builds it (`--configs <block> --task <task>`), and the
wrapper stack around it: shared by the suite tests that check the paper's settings."""
import config as config_module
import envs


def paper_env(block: str, task: str | None = None, **overrides):
    """(config, make_env's train env 0) for `--configs block [--task task] --key value ...`."""
    argv = ['--configs', block] + (['--task', task] if task else [])
    for key, value in overrides.items():
        argv += [f'--{key}', str(value)]
    config = config_module.load_config(argv)
    return config, envs.make_env(config, 'train', 0)


def unwrap(env, cls) -> tuple[list[str], object]:
    """(the wrappers' class names from the outside in, the innermost `cls` env)."""
    names = []
    while not isinstance(env, cls):
        names.append(type(env).__name__)
        env = env.env
    return names, env
