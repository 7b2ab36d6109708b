"""The `distmeta` command: personalized models in use.

    distmeta enroll --model runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors --person alice alice.csv
    distmeta enroll --kind speaker --model runs/icl-models/speech_lm-<hash>-TU_LU.safetensors --person sam pairs.csv
    distmeta predict --profile alice clips/ > alice.csv
    distmeta predict --model runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors a.wav b.wav
    distmeta profiles list | show alice | delete alice
    distmeta serve --model runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors   # http://127.0.0.1:8000

Profiles live in `--store` (default ~/.local/share/distmeta/profiles). Exit status: 0 when every file was
predicted, 1 when some could not be read (their rows say why), 2 on bad usage.
"""

import argparse
import csv
import json
import signal
import sys
import time
from pathlib import Path

AUDIO = (".wav", ".flac", ".ogg")


def audio_files(items: list[str]) -> list[str]:
    """Files as given; a folder: its audio files (sorted); a .csv: its `path` column."""
    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += [str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in AUDIO]
        elif path.suffix.lower() == ".csv":
            from distmeta.profiles.store import csv_rows

            files += [clip for _, _, clip in csv_rows(path, ("path",))]
        else:
            files.append(item)
    return files


def enroll(args) -> int:
    from distmeta.profiles.kinds import enroll_from, kind_of, load_base
    from distmeta.profiles.store import ProfileStore

    base = load_base(args.model)
    if args.kind and args.kind != kind_of(base):
        raise ValueError(f"--kind {args.kind}, but {args.model} is a {kind_of(base)} model")
    tensors, meta = enroll_from(base, args.labels)  # listeners: warns (stderr) below 8 clips
    path = ProfileStore(args.store).save(args.person, tensors, meta)
    print(f"enrolled {meta['kind']} {args.person!r} from {meta['shots']} clips on base {base.digest}: {path}")
    return 0


def predict(args) -> int:
    from distmeta.profiles.kinds import load_base, predict_with
    from distmeta.profiles.store import ProfileStore
    from distmeta.report import Progress

    adapted, profile = None, {}
    if args.profile:
        adapted, profile = ProfileStore(args.store).load(args.profile)
    model = args.model or profile.get("base_path")
    base = load_base(model)
    if profile and profile["base"] != base.digest:
        raise SystemExit(f"profile {args.profile!r} belongs to base model {profile['base']}, not {base.digest} ({model})")
    files = audio_files(args.inputs)
    shown = Progress("predicted file", len(files), log=lambda line: print(line, file=sys.stderr, flush=True),
                     bar=sys.stderr.isatty())  # stdout may be the predictions themselves
    rows = predict_with(base, files, adapted, profile, progress=lambda done, _: shown.update(done))
    for row in rows:
        row.update({"profile": args.profile or "", "base": base.digest})
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if args.format == "jsonl":
            for row in rows:
                out.write(json.dumps(row) + "\n")
        else:
            # the columns of a predicted row first (path, classes, labels, ...), then any only a failed row has
            columns = list(dict.fromkeys([k for row in rows if not row["error"] for k in row] + [k for row in rows for k in row]))
            columns = [c for c in columns if c != "error"] + ["error"]
            writer = csv.DictWriter(out, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    finally:
        if args.output:
            out.close()
    failed = [row for row in rows if row["error"]]
    if failed:
        print(f"{len(failed)} of {len(rows)} files could not be read (see their error column)", file=sys.stderr)
    return 1 if failed else 0


def profiles(args) -> int:
    from distmeta.profiles.store import ProfileStore

    store = ProfileStore(args.store)
    if args.action == "list":
        for meta in store.list():
            print(f"{meta['person']}\t{meta['kind']}\tK={meta['shots']}\tbase {meta['base']}\t{meta['created']}")
    elif args.action == "show":
        print(json.dumps(store.meta(args.person), indent=2))
    else:
        store.delete(args.person)
        print(f"deleted {args.person!r} from {store.folder}")
    return 0


def serve(args) -> int:
    from ray import serve as ray_serve

    from distmeta.cluster import connect
    from distmeta.profiles.kinds import kind_of, load_base
    from distmeta.profiles.serve import start

    base = load_base(args.model)  # fails here, not in a replica; a models:/ URI becomes its local file
    connect(args.ray_address)
    url = start(str(base.path), args.store, host=args.host, port=args.port, max_profiles=args.max_profiles_per_replica,
                max_body_mb=args.max_body_mb, replicas=args.replicas)
    print(f"serving {kind_of(base)} model {base.digest} ({base.path}) and its profiles at {url}\n"
          f"  curl {url}/health\n  curl {url}/profiles\n"
          f"  curl --data-binary @clip.wav -H 'serve_multiplexed_model_id: alice' {url}/predict\n"
          f"  tar -C alice -cf - . | curl --data-binary @- '{url}/enroll?person=alice'\n"
          f"Ctrl-C (or SIGTERM) stops it.", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop: shut Serve down as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a launcher left SIGINT ignored
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="distmeta", description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="profile folder (default ~/.local/share/distmeta/profiles)")
    commands = main.add_subparsers(dest="command", required=True)
    e = commands.add_parser("enroll", parents=[common], help="adapt a meta-trained model to one person's labelled clips")
    e.add_argument("--kind", choices=["listener", "speaker"],
                   help="listener: Meta-PerSER adapted to the person's labels as its meta-test does (meta.test_adapt); speaker: the "
                        "speech LM's enrollment pairs (at most 7), encoded once (default: the model's kind)")
    e.add_argument("--model", required=True,
                   help="listener: a meta-trained model, models_dir/<scenario>/<annotator>/meta-*.safetensors or "
                        "models:/distmeta-listener/N; speaker: a speech LM, models_dir/speech_lm-*-TU_LU.safetensors "
                        "or models:/distmeta-speaker/N")
    e.add_argument("--person", required=True, help="the profile id (letters, digits, _ . -)")
    e.add_argument("labels", help="listener: CSV with columns path,labels (labels joined by ';'); speaker: CSV with "
                                  "columns path,label, 1-7 rows (the label words or class names); paths relative to the CSV")
    e.set_defaults(run=enroll)
    p = commands.add_parser("predict", parents=[common], help="emotions of audio files, with a profile or the unpersonalized model")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--profile", help="a profile id from `distmeta enroll`")
    who.add_argument("--model", help="the base model alone (no personalization; a speech LM reads no pairs)")
    p.add_argument("inputs", nargs="+", help="audio files, folders of them, or a CSV with a path column")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--output", help="file to write (default: stdout)")
    p.set_defaults(run=predict)
    v = commands.add_parser("serve", parents=[common], help="serve the model and every profile over HTTP (Ray Serve)",
                            description="POST /predict (audio body; header serve_multiplexed_model_id: PROFILE), "
                                        "POST /enroll?person=ID (a tar of labels.csv and its clips), GET /profiles, GET /health. "
                                        "See docs/use.md.")
    v.add_argument("--model", required=True, help="the meta-trained model the profiles were enrolled on (file or models:/ URI)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0 exposes it, put authentication in front)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-profiles-per-replica", type=int, default=8,
                   help="profiles a model replica keeps loaded; beyond it the least recently used is evicted")
    v.add_argument("--max-body-mb", type=float, default=20.0, help="larger request bodies are refused (413)")
    v.add_argument("--replicas", type=int, default=1, help="model replicas (each loads the base model once)")
    v.add_argument("--ray-address", default="", help="a Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    v.set_defaults(run=serve)
    s = commands.add_parser("profiles", parents=[common], help="list, show or delete profiles")
    s.add_argument("action", choices=["list", "show", "delete"])
    s.add_argument("person", nargs="?", help="the profile id (show, delete)")
    s.set_defaults(run=profiles)
    return main


def main(argv=None) -> int:
    from distmeta.profiles.store import ProfileError

    args = parser().parse_args(argv)
    if args.command == "profiles" and args.action != "list" and not args.person:
        parser().error(f"profiles {args.action} needs a profile id")
    try:
        return args.run(args)
    except (ProfileError, FileNotFoundError, ValueError) as err:
        print(f"distmeta {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
