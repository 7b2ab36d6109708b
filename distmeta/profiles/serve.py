"""`distmeta serve`: many people's profiles behind one Ray Serve application.

    POST /predict                  body: one audio file (wav, flac, ogg); header serve_multiplexed_model_id: the
                                   profile id (no header: the unpersonalized model) -> probabilities and labels
    POST /enroll?person=ID         body: a tar (or .tar.gz) of labels.csv and the clips it names -> the new profile
                                   (listener model: columns path,labels; speaker model: path,label, 1-7 rows)
    GET  /profiles                 the store's profiles, and whether each belongs to the served base model
    GET  /health                   the base model, and the profiles loaded on the replica that answered

Two deployments. `Ingress` speaks HTTP: it checks sizes and maps failures to status codes (400 unreadable
audio or bad enrollment, 404 unknown profile or path, 413 a body over the limit); every failure is an
answer, so the server keeps serving. `ProfileModel` loads the base model (a Meta-PerSER listener model or a
MetaICL speech LM; one server serves one base model and its profiles) once per replica and a person's
profile on demand through `@serve.multiplexed`: the ingress passes the header's profile id on as the
handle's `multiplexed_model_id`, so Serve routes a person's requests to a replica that holds their profile,
and each replica keeps at most `max_profiles` of them, evicting the least recently used. A profile
re-enrolled or deleted on disk is noticed at its next request (its JSON's modification time).

Predictions are `profiles.kinds.predict_with`, the function `distmeta predict` runs, on the request body.
"""

import asyncio
import io
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from distmeta.profiles.kinds import enroll_from, kind_of, load_base, predict_with
from distmeta.profiles.store import ProfileError, ProfileStore

MAX_BODY_MB = 20.0
AUDIO_SUFFIX = {b"RIFF": ".wav", b"fLaC": ".flac", b"OggS": ".ogg"}


class Profile:
    """A loaded profile; `__del__` is what Serve calls when it evicts one (and Python, later, again)."""

    def __init__(self, person: str, tensors: dict, meta: dict, stamp: int, loaded: dict):
        self.person, self.tensors, self.meta, self.stamp, self.loaded = person, tensors, meta, stamp, loaded
        loaded[person] = id(self)

    def __del__(self):
        if self.loaded.get(self.person) == id(self):  # not a newer load of the same person
            del self.loaded[self.person]


def enrollment_archive(clips: list[tuple[str, str]], column: str = "labels") -> bytes:
    """A POST /enroll body from (clip path, label text) pairs: a tar of labels.csv (`column`: labels for a
    listener model, label for a speaker model) and the clips, as `tar -C folder -cf - .` makes one."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        rows = [f"path,{column}"]
        for i, (path, labels) in enumerate(clips):
            name = f"clips/{i}{Path(path).suffix}"
            tar.add(path, arcname=name)
            rows.append(f"{name},{labels}")
        table = ("\n".join(rows) + "\n").encode()
        info = tarfile.TarInfo("labels.csv")
        info.size = len(table)
        tar.addfile(info, io.BytesIO(table))
    return out.getvalue()


def unpack_enrollment(archive: bytes, folder: Path) -> Path:
    """Write a tar's regular files into `folder` (never outside it) and return its labels.csv."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            for member in tar.getmembers():
                name = PurePosixPath(member.name)
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    continue  # folders, links and paths leaving the archive are skipped
                target = folder.joinpath(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    except tarfile.TarError as err:
        raise ValueError(f"the body is not a tar archive ({err})") from None
    found = sorted(folder.rglob("labels.csv"), key=lambda p: len(p.parts))
    if not found:
        raise ValueError("the archive holds no labels.csv (columns path,labels; paths relative to it)")
    return found[0]


@serve.deployment
class ProfileModel:
    """The base model (listener or speaker) and its people's profiles, on one replica."""

    def __init__(self, model: str, store: str | None, max_profiles: int):
        self.base = load_base(model)
        self.kind = kind_of(self.base)
        self.store = ProfileStore(store)
        self.loaded: dict[str, int] = {}  # profile id -> the Profile this replica holds for it
        self.loads: dict[str, int] = {}
        # One computation at a time per replica: adapted parameters are swapped into the one model for a call
        # (torch.func.functional_call) and s3prl collects hidden states in a per-model buffer; torch uses the
        # cores within a call, more replicas serve more calls at once.
        self.busy = asyncio.Lock()
        async def load(person: str) -> Profile:  # a plain function: Serve keeps its cache on the decorated object
            return await self._load(person)

        # wired here, not as a decorator: the limit is a command-line flag
        self.profile = serve.multiplexed(max_num_models_per_replica=max_profiles)(load)

    def _stamp(self, person: str) -> int:
        sidecar = self.store.sidecar(person)
        if not sidecar.is_file():
            raise ProfileError(f"no profile {person!r}")
        return sidecar.stat().st_mtime_ns

    async def _load(self, person: str) -> Profile:
        stamp = self._stamp(person)
        tensors, meta = self.store.load(person)
        if meta.get("base") != self.base.digest or meta.get("kind") != self.kind:
            raise ProfileError(f"profile {person!r} is a {meta.get('kind')} profile of base model {meta.get('base')}, "
                               f"not of the served {self.kind} model {self.base.digest}")
        self.loads[person] = self.loads.get(person, 0) + 1
        return Profile(person, tensors, meta, stamp, self.loaded)

    async def _current(self, person: str) -> Profile:
        profile = await self.profile(person)
        if self._stamp(person) != profile.stamp:  # re-enrolled since it was loaded: read it again
            fresh = await self._load(person)
            profile.tensors, profile.meta, profile.stamp = fresh.tensors, fresh.meta, fresh.stamp
            self.loaded[person] = id(profile)
        return profile

    async def predict(self, audio: bytes) -> dict:
        person = serve.get_multiplexed_model_id()
        try:
            profile = (await self._current(person)) if person else None
        except ProfileError as err:
            return {"status": 404, "error": str(err)}
        with tempfile.NamedTemporaryFile(suffix=AUDIO_SUFFIX.get(audio[:4], ".wav")) as f:
            f.write(audio)
            f.flush()
            async with self.busy:
                row = (await asyncio.to_thread(predict_with, self.base, [f.name], profile and profile.tensors,
                                               profile and profile.meta))[0]
        if row["error"]:
            return {"status": 400, "error": row["error"].replace(f.name, "request body")}
        del row["error"], row["path"]
        answer = {key: row.pop(key) for key in ("labels", "label", "score") if key in row}  # listener: labels; speaker: label, score
        if "labels" in answer:
            answer["labels"] = answer["labels"].split(";") if answer["labels"] else []
        return {"status": 200, "probabilities": row, **answer, "profile": person, "kind": self.kind, "base": self.base.digest}

    async def enroll(self, person: str, archive: bytes) -> dict:
        def run():
            with tempfile.TemporaryDirectory() as folder:
                try:
                    tensors, meta = enroll_from(self.base, unpack_enrollment(archive, Path(folder)))
                except ValueError as err:  # name files as they are in the archive
                    raise ValueError(str(err).replace(folder + "/", "")) from None
                self.store.save(person, tensors, meta)
                return meta

        try:
            self.store.sidecar(person)  # a bad id is refused before any work
            async with self.busy:
                meta = await asyncio.to_thread(run)
        except (ProfileError, ValueError) as err:
            return {"status": 400, "error": str(err)}
        return {"status": 200, **meta, "person": person}

    async def profiles(self) -> dict:
        return {"status": 200, "base": self.base.digest,
                "profiles": [{**meta, "usable": meta.get("base") == self.base.digest and meta.get("kind") == self.kind}
                             for meta in self.store.list()]}

    async def health(self) -> dict:
        return {"status": 200, "kind": self.kind, "base": self.base.digest, "base_path": str(self.base.path), "loaded": sorted(self.loaded),
                "loads": dict(self.loads)}


@serve.deployment(ray_actor_options={"num_cpus": 0})  # it only awaits the model replicas (one CPU each)
class Ingress:
    def __init__(self, model, max_body_bytes: int):
        self.model, self.max_body_bytes = model, max_body_bytes

    async def _body(self, request: Request) -> bytes | None:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        body = await request.body()
        return None if len(body) > self.max_body_bytes else body

    async def __call__(self, request: Request) -> JSONResponse:
        route = (request.method, request.url.path.rstrip("/") or "/")
        if route == ("GET", "/health"):
            answer = await self.model.health.remote()
        elif route == ("GET", "/profiles"):
            answer = await self.model.profiles.remote()
        elif route[1] in ("/predict", "/enroll") and route[0] == "POST":
            body = await self._body(request)
            if body is None:
                answer = {"status": 413, "error": f"the body is over the limit of {self.max_body_bytes} bytes"}
            elif not body:
                answer = {"status": 400, "error": "empty body: send the audio file (predict) or a tar (enroll)"}
            elif route[1] == "/predict":
                person = request.headers.get("serve_multiplexed_model_id", "")
                answer = await self.model.options(multiplexed_model_id=person).predict.remote(body)
            elif not request.query_params.get("person"):
                answer = {"status": 400, "error": "enroll needs ?person=ID"}
            else:
                answer = await self.model.enroll.remote(request.query_params["person"], body)
        else:
            answer = {"status": 404, "error": f"no route {route[0]} {route[1]}; routes: POST /predict, POST /enroll, "
                                              f"GET /profiles, GET /health"}
        return JSONResponse({k: v for k, v in answer.items() if k != "status"}, status_code=answer["status"])


def application(model: str, store: str | None = None, max_profiles: int = 8, max_body_mb: float = MAX_BODY_MB,
                replicas: int = 1):
    """The bound Serve application: the ingress in front of `replicas` model replicas."""
    if max_profiles < 1:
        raise ValueError(f"max_profiles must be at least 1, got {max_profiles}")
    replica = ProfileModel.options(num_replicas=replicas).bind(str(model), None if store is None else str(store), max_profiles)
    return Ingress.bind(replica, int(max_body_mb * 1024 * 1024))


def start(model: str, store=None, host: str = "127.0.0.1", port: int = 8000, **options) -> str:
    """Start Serve's HTTP proxy on host:port and run the application; returns its URL."""
    import ray

    cpus, replicas = ray.cluster_resources().get("CPU", 0), options.get("replicas", 1)
    if replicas > cpus:  # Serve would wait forever for a CPU for the extra replicas
        raise ValueError(f"{replicas} model replicas need a CPU each; the Ray cluster has {cpus:g}")
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(model, store, **options), name="distmeta", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
