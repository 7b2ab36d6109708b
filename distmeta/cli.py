"""The `distmeta` command: personalized models in use.

    distmeta enroll --model runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors --person alice alice.csv
    distmeta enroll --kind speaker --model runs/icl-models/speech_lm-<hash>-TU_LU.safetensors --person sam pairs.csv
    distmeta predict --profile alice clips/ --top-k 3 > alice.csv
    distmeta predict --model runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors a.wav b.wav
    distmeta profiles list | show alice | delete alice
    distmeta serve --model runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors   # http://127.0.0.1:8000

Profiles live in `--store` (default ~/.local/share/distmeta/profiles). Exit status: 0 when every file was
predicted, 1 when some could not be read (their rows say why), 2 on bad usage.
"""

import argparse
import csv
import json
import os
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
    from distmeta.profiles.personalizer import Personalizer
    from distmeta.profiles.listener import read_labelled
    from distmeta.profiles.speaker import read_pairs

    p = Personalizer.from_pretrained(args.model, args.device, args.store)
    if args.kind and args.kind != p.kind:
        raise ValueError(f"--kind {args.kind}, but {args.model} is a {p.kind} model")
    rows = read_pairs(args.labels, p.labels) if p.kind == "speaker" else read_labelled(args.labels)
    p.enroll([clip for clip, _ in rows], [label for _, label in rows], person=args.person, overwrite=args.overwrite)  # listeners: warns (stderr) below 8 clips
    print(f"enrolled {p.kind} {args.person!r} from {len(rows)} clips on base {p.digest}: {p.store.path(args.person)}")
    return 0


def flat_row(record: dict) -> dict:
    """A CSV row of an output record: label, score, label_2, score_2, ... then the rest (labels joined by ';')."""
    row = {"path": record["path"]}
    for rank, pair in enumerate(record.get("scores", []), start=1):
        suffix = "" if rank == 1 else f"_{rank}"
        row.update({f"label{suffix}": pair["label"], f"score{suffix}": pair["score"]})
    if "labels" in record:
        row["labels"] = ";".join(record["labels"])
    return row | {k: record[k] for k in ("profile", "base", "error")}


def predict(args) -> int:
    from distmeta.data.audio import AudioError
    from distmeta.profiles.personalizer import Personalizer
    from distmeta.report import Progress

    if args.profile:
        p = Personalizer.for_profile(args.profile, args.store, args.model, args.device)
        profile = p.profile(args.profile)
    elif args.model:
        p, profile = Personalizer.from_pretrained(args.model, args.device, args.store), None
    else:
        raise ValueError("give --profile, --model, or both")
    files = audio_files(args.inputs)
    shown = Progress("predicted file", len(files), log=lambda line: print(line, file=sys.stderr, flush=True),
                     bar=sys.stderr.isatty())  # stdout may be the predictions themselves
    records = []
    for start in range(0, len(files), 32):
        chunk, good = files[start:start + 32], {}
        for file in chunk:
            try:
                good[file] = p.read([file])[0]
            except AudioError as err:
                records.append({"path": file, "error": str(err)})
                continue
            records.append({"path": file, "error": ""})
        found = iter(p.records(p.probabilities(list(good.values()), profile), args.top_k))
        for record in records[-len(chunk):]:
            if not record["error"]:
                record.update(next(found))
        shown.update(len(records))
    for record in records:
        record.update({"profile": args.profile or "", "base": p.digest})
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if args.format == "jsonl":
            for record in records:
                out.write(json.dumps(record) + "\n")
        else:
            rows = [flat_row(record) for record in records]
            # the columns of a predicted row first (path, label, score, ...), then any only a failed row has
            columns = list(dict.fromkeys([k for row in rows if not row["error"] for k in row] + [k for row in rows for k in row]))
            columns = [c for c in columns if c != "error"] + ["error"]
            writer = csv.DictWriter(out, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    finally:
        if args.output:
            out.close()
    failed = [record for record in records if record["error"]]
    if failed:
        print(f"{len(failed)} of {len(records)} files could not be read (see their error column)", file=sys.stderr)
    return 1 if failed else 0


def profiles(args) -> int:
    from distmeta.profiles.store import ProfileStore

    store = ProfileStore(args.store)
    if args.action == "list":
        for meta in store.list():
            if "error" in meta:
                print(f"{meta['person']}\t{meta['error']}")
            else:
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
    from distmeta.profiles.personalizer import load_base
    from distmeta.profiles.serve import LOOPBACK, ServeArgs, start

    base = load_base(args.model)  # fails here, not in a replica; a models:/ URI becomes its local file
    settings = ServeArgs(model=args.model, store=args.store, max_profiles=args.max_profiles_per_replica,
                         max_body_mb=args.max_body_mb, max_clip_seconds=args.max_clip_seconds, max_clips=args.max_clips,
                         replicas=args.replicas, device=args.device, num_gpus=args.num_gpus, token=args.token)
    connect(args.ray_address)
    url = start(settings, host=args.host, port=args.port)
    auth = " -H 'Authorization: Bearer $DISTMETA_TOKEN'" if settings.token or os.environ.get("DISTMETA_TOKEN") else ""
    print(f"serving {base.kind} model {base.digest} ({base.path}) and its profiles at {url} (API: {url}/docs)\n"
          f"  curl{auth} {url}/health\n  curl{auth} {url}/profiles\n"
          f"  curl{auth} --data-binary @clip.wav {url}/profiles/alice/predict\n"
          f"  tar -C alice -cf - . | curl{auth} --data-binary @- {url}/profiles/alice/enroll\n"
          f"Ctrl-C (or SIGTERM) stops it.", flush=True)
    if args.host not in LOOPBACK:
        print(f"warning: bound to {args.host}: reachable from other machines (the token guards every route but /docs)",
              file=sys.stderr, flush=True)
    elif not auth:
        print("note: no token; anyone on this machine can enroll and predict (--token or $DISTMETA_TOKEN to require one)",
              file=sys.stderr, flush=True)

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
    common.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, ...")
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
    e.add_argument("--overwrite", action="store_true", help="replace a profile of another kind or base model of this id")
    e.add_argument("labels", help="listener: CSV with columns path,labels (labels joined by ';'); speaker: CSV with "
                                  "columns path,label, 1-7 rows (the label words or class names); paths relative to the CSV")
    e.set_defaults(run=enroll)
    p = commands.add_parser("predict", parents=[common], help="emotions of audio files, with a profile or the unpersonalized model")
    p.add_argument("--profile", help="a profile id from `distmeta enroll` (its base model: --model, else where the store last "
                                     "found it)")
    p.add_argument("--model", help="the base model (file or models:/ URI); alone: no personalization (a speech LM reads no pairs)")
    p.add_argument("--top-k", type=int, help="the k most probable labels per file (default: all)")
    p.add_argument("inputs", nargs="+", help="audio files, folders of them, or a CSV with a path column")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--output", help="file to write (default: stdout)")
    p.set_defaults(run=predict)
    v = commands.add_parser("serve", parents=[common], help="serve the model and every profile over HTTP (Ray Serve)",
                            description="POST /profiles/ID/predict (an audio body), POST /profiles/ID/enroll (a tar of "
                                        "labels.csv and its clips, or a multipart form), GET /profiles, GET /health, GET /docs. "
                                        "See docs/use.md.")
    v.add_argument("--model", required=True, help="the meta-trained model the profiles were enrolled on (file or models:/ URI)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "another address needs --token)")
    v.add_argument("--token", help="require `Authorization: Bearer TOKEN` on every route but /docs (default $DISTMETA_TOKEN)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-profiles-per-replica", type=int, default=8,
                   help="profiles a model replica keeps loaded; beyond it the least recently used is evicted")
    v.add_argument("--max-body-mb", type=float, default=20.0, help="larger request bodies are refused (413)")
    v.add_argument("--max-clip-seconds", type=float, default=60.0, help="longer clips are refused (400), from their header")
    v.add_argument("--max-clips", type=int, default=256, help="most clips one enrollment may hold")
    v.add_argument("--replicas", type=int, default=1, help="model replicas (each loads the base model once)")
    v.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (fractional allowed; with --device cuda)")
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
    except (ProfileError, FileNotFoundError, ValueError) as err:  # AudioError and ProfileConflict are ValueErrors
        print(f"distmeta {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
