"""Every option an entry point lists in --help reaches the code that uses it, or is refused.

Each entry point runs once, for a few steps, with every config read recorded (after parsing; the
config dump does not count; loader_config copies the data section without reading it). An option never read in that run must be one whose declared condition (``option(...,
applies=...)``) the run does not meet, and typed on the command line where its condition is not met,
it is refused in one line. Nothing writes to the config after parsing (the entry points get it
frozen)."""
import dataclasses
import json
from contextlib import contextmanager

import pytest

from fastclr import config as C
from fastclr import distill, finetune, linear_eval, pretrain, presets
from loaders import config as LC
from loaders import options

pytestmark = pytest.mark.e2e

SECTIONS = [LC.DataConfig, C.ModelConfig, C.ClassifierModelConfig, C.OptimConfig, C.LossConfig, C.BaseRunConfig, C.RunConfig,
            C.TrainRunConfig, C.SubsetConfig, C.DistillSection, C.PretrainConfig, C.FinetuneConfig,
            C.DistillConfig, C.LinearEvalConfig]
TINY = ["--data.image_size=32", "--optim.global_batch_size=8", "--run.progress=false", "--run.log_every=1",
        "--run.max_steps=2"]


class Reads:
    """Leaf-field reads of config objects while ``on``, as (class, field) pairs."""

    def __init__(self):
        self.on, self.quiet, self.seen = False, 0, set()

    def record(self, obj, name):
        if self.on and not self.quiet:
            self.seen.add((type(obj), name))


@contextmanager
def tracking(monkeypatch):
    reads = Reads()
    for cls in SECTIONS:
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names, _base=object.__getattribute__):
            if name in _names:
                reads.record(self, name)
            return _base(self, name)
        monkeypatch.setattr(cls, "__getattribute__", getattribute)

    def quiet(fn):
        def wrapped(*a, **k):
            reads.quiet += 1
            try:
                return fn(*a, **k)
            finally:
                reads.quiet -= 1
        return wrapped
    monkeypatch.setattr(dataclasses, "asdict", quiet(dataclasses.asdict))
    parse = options.parse

    def parse_then_track(*a, **k):
        cfg = parse(*a, **k)
        reads.on = True
        return cfg
    monkeypatch.setattr(options, "parse", parse_then_track)
    monkeypatch.setattr(C, "parse", parse_then_track)
    yield reads


def read_keys(cfg_cls, reads: Reads) -> set[str]:
    """The dotted keys of ``cfg_cls`` whose field was read (any object of the field's class counts: a
    LoaderConfig read is a read of the data section's field)."""
    out = set()
    for key, f, _ in options._fields(cfg_cls):
        owner = options.owner_class(cfg_cls, key)
        if any(issubclass(cls, owner) and name == f.name for cls, name in reads.seen):
            out.add(key)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, image_folder):
    from test_finetune import fake_pretrain_ckpt
    d = tmp_path_factory.mktemp("pre")
    fake_pretrain_ckpt(d / "ckpt_00000001.pt")
    return d


def runs(image_folder, pretrained, tmp_path):
    """(entry point, config class, argv) of one short run of each."""
    common = [f"--data.path={image_folder}", f"--run.val_path={image_folder}", *TINY]
    teacher = tmp_path / "ft"
    return [
        ("pretrain", pretrain.main, C.PretrainConfig,
         ["demo_cpu", *common, f"--run.out_dir={tmp_path / 'pre'}", "--run.knn_train_size=8",
          "--run.knn_val_size=8", "--run.probe_labels_per_class=1"]),
        ("finetune", finetune.main, C.FinetuneConfig,
         [f"--ckpt={pretrained}", *common, "--run.eval_batch_size=24", f"--run.out_dir={teacher}", "--subset.fraction=0.5"]),
        ("distill", distill.main, C.DistillConfig,
         [f"--teacher={teacher}", *common, f"--run.out_dir={tmp_path / 'st'}"]),
        ("linear_eval", linear_eval.main, C.LinearEvalConfig,
         [f"--ckpt={pretrained}", *common, f"--run.out_dir={tmp_path / 'le'}"]),
    ]


def test_every_option_is_read_or_does_not_apply(image_folder, pretrained, tmp_path, monkeypatch):
    unread = {}
    for name, main, cls, argv in runs(image_folder, pretrained, tmp_path):
        with tracking(monkeypatch) as reads:
            assert main(argv) == 0, name
        cfg = options.parse_into(cls(), list(argv), getattr(presets, name.upper().replace("LINEAR_EVAL", "LINEAR")),
                                 name)
        missing = [k for k in options.keys(cls) if k not in read_keys(cls, reads)
                   and options.applies(cfg, k) is None]
        unread[name] = missing
        monkeypatch.undo()
    assert unread == {n: [] for n in unread}, json.dumps(unread, indent=1)


def other_value(f, tp, default):
    """A valid value of a field that differs from its default, as a command-line string."""
    choices = f.metadata.get("choices")
    if choices:
        return str(next(c for c in choices if c != default))
    if tp is bool:
        return str(not default).lower()
    if tp is int:
        return str(default + 1)
    if tp is float:
        return str(default / 2 if default else 0.5)
    if tp is str:
        return "x"
    if "Tuple" in str(tp):
        return "0.5,1.0"
    return "0.5"  # Optional[float]


@pytest.mark.parametrize("cls, table", [(C.PretrainConfig, presets.PRETRAIN), (C.FinetuneConfig, presets.FINETUNE),
                                        (C.DistillConfig, presets.DISTILL), (C.LinearEvalConfig, presets.LINEAR)],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_an_option_typed_where_it_does_not_apply_is_refused(cls, table):
    """Every conditional option, typed on top of a command line that does not meet its condition: one
    line naming the option and the condition. (ckpt / teacher given, as the commands need them.)"""
    base = {C.FinetuneConfig: ["--ckpt=runs/x"], C.LinearEvalConfig: ["--ckpt=runs/x"],
            C.DistillConfig: ["--teacher=runs/x"]}.get(cls, [])
    refused = 0
    for key, f, tp in options._fields(cls):
        if "applies" not in f.metadata:
            continue
        cfg = options.parse_into(cls(), list(base), table)
        if options.applies(cfg, key) is None:
            continue  # it applies to this command line: nothing to refuse
        argv = base + [f"--{key}={other_value(f, tp, options.get_value(cfg, key))}"]
        with pytest.raises(options.ConfigError) as e:
            options.parse_into(cls(), argv, table)
        msg = str(e.value)
        assert msg.startswith(f"--{key} ") and "\n" not in msg, msg
        refused += 1
    assert refused > 0


def test_conditions_read_like_the_user_would_type_them():
    cfg = options.parse_into(C.PretrainConfig(), ["--data.backend=dali", "--data.hw_decoder_load=0.5"], {})
    assert cfg.data.hw_decoder_load == 0.5  # the condition may come after the option
    with pytest.raises(options.ConfigError, match=r"--data.hw_decoder_load applies only with "
                                                  r"--data.backend=dali \(here torch\)"):
        options.parse_into(C.PretrainConfig(), ["--data.hw_decoder_load=0.5"], {})
    with pytest.raises(options.ConfigError, match=r"--loss.queue_momentum applies only with --loss.queue_size > 0"):
        options.parse_into(C.PretrainConfig(), ["--loss.queue_momentum=0.9"], {})
    with pytest.raises(options.ConfigError, match=r"--model.stem_stride applies only with --model.cifar_stem=true"):
        options.parse_into(C.PretrainConfig(), ["--model.stem_stride=2"], {})
    assert options.parse_into(C.PretrainConfig(), ["--model.stem_stride=2", "--model.cifar_stem=true"],
                              {}).model.stem_stride == 2
    with pytest.raises(options.ConfigError, match="the architecture is the checkpoint's"):
        options.parse_into(C.FinetuneConfig(), ["--ckpt=a.pt", "--model.depth=18"], {})
    assert options.parse_into(C.FinetuneConfig(), ["--ckpt=none", "--model.depth=18"], {}).model.depth == 18
