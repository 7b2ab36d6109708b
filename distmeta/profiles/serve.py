"""`distmeta serve`: many people's profiles behind one Ray Serve application with a FastAPI ingress.

    POST /profiles/{id}/predict    body: one audio file (wav, flac, ogg) -> scores (sorted), labels (listener)
    POST /predict                  the same; the profile in the header serve_multiplexed_model_id (none: the
                                   unpersonalized model)
    POST /profiles/{id}/enroll     body: a tar (or .tar.gz) of labels.csv and its clips, or a multipart form
                                   (files `clips`, one field `labels` per clip) -> the new profile
    POST /enroll?person=ID         the same
    GET  /profiles                 the store's profiles, and whether each belongs to the served base model
    GET  /health                   the base model, the profiles loaded on the replica that answered, peak memory
    GET  /docs                     the OpenAPI page (/openapi.json the schema)

Two deployments. `Ingress` speaks HTTP: it checks the token, reads bodies within their size limit while they
stream in, unpacks enrollments within `uploads.UploadLimits`, and answers failures as `{"detail": ...}` with
their status (400 bad input, 401 no or wrong token, 404 unknown profile or path, 409 enrolling over another
model's profile, 413 too large). `ProfileModel` holds a `Personalizer` (the base model, loaded once per
replica) and people's profiles, loaded on demand through `@serve.multiplexed`: the ingress passes the profile
id on as the handle's `multiplexed_model_id`, so Serve routes a person's requests to a replica that holds
their profile, and a replica keeps at most `max_profiles` of them, evicting the least recently used (an id
with no profile is refused before that, so it evicts nothing). A profile re-enrolled on disk is noticed at its
next request. Predictions are `Personalizer.classify`'s records, what `distmeta predict` writes.
"""

import asyncio
import hmac
import logging
import os
import resource

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from ray import serve
from starlette.formparsers import MultiPartParser

from distmeta.data.audio import AudioLimits
from distmeta.profiles.personalizer import Personalizer
from distmeta.profiles.store import ProfileConflict, ProfileError, check_id
from distmeta.profiles.uploads import UploadLimits, archive_enrollment

LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADER = "serve_multiplexed_model_id"
AUDIO_BODY = {"requestBody": {"required": True, "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}}}}
log = logging.getLogger("ray.serve")


class ServeArgs(BaseModel):
    """The application's settings: `distmeta serve`'s flags, `serve run distmeta.profiles.serve:build k=v`'s
    arguments, or a Serve config file's `args`."""
    model: str                       # a base model file or models:/ URI
    store: str | None = None         # the profile folder (default ~/.local/share/distmeta/profiles)
    max_profiles: int = 8            # profiles a model replica keeps loaded (LRU)
    max_body_mb: float = 20.0        # larger bodies: 413, counted while they stream in
    max_clip_seconds: float = 60.0   # longer clips (from their header): 400
    max_clips: int = 256             # enrollment clips (a speaker model: also its max_shots)
    replicas: int = 1                # model replicas, each computing one request at a time
    device: str = "cpu"              # where a replica runs its model: cpu, cuda, cuda:1
    num_gpus: float = 0.0            # GPUs reserved per model replica (fractional allowed)
    token: str | None = None         # required as `Authorization: Bearer <token>` (default $DISTMETA_TOKEN)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def failure(err: Exception) -> dict:
    """A bad input as an answer: 404 unknown profile, 409 conflict, 400 otherwise."""
    status = 404 if isinstance(err, ProfileError) else 409 if isinstance(err, ProfileConflict) else 400
    return {"status": status, "detail": str(err)}


@serve.deployment
class ProfileModel:
    """The base model (listener or speaker) and its people's profiles, on one replica."""

    def __init__(self, args: ServeArgs):
        limits = AudioLimits(max_seconds=args.max_clip_seconds)
        self.p = Personalizer.from_pretrained(args.model, args.device, args.store, limits=limits, max_clips=args.max_clips)
        self.loaded: dict[str, int] = {}  # profile id -> the _Loaded this replica holds for it
        self.loads: dict[str, int] = {}
        # A Personalizer computes one call at a time (its own lock); more replicas serve more calls at once.

        async def load(person: str):  # a plain function: Serve keeps its cache on the decorated object
            return await self._load(person)

        # wired here, not as a decorator: the limit is a setting
        self.profile = serve.multiplexed(max_num_models_per_replica=args.max_profiles)(load)

    async def _load(self, person: str):
        stamp = self.p.store.stamp(person)
        profile = self.p.profile(person)
        self.loads[person] = self.loads.get(person, 0) + 1
        return _Loaded(profile, stamp, self.loaded)

    async def _current(self, person: str):
        stamp = self.p.store.stamp(person)  # first: an unknown id is refused before it can evict a loaded profile
        held = await self.profile(person)
        if stamp != held.stamp:  # re-enrolled since it was loaded: read it again
            fresh = await self._load(person)
            held.profile, held.stamp = fresh.profile, fresh.stamp
            self.loaded[person] = id(held)
        return held.profile

    async def predict(self, audio: bytes, top_k: int | None = None) -> dict:
        person = serve.get_multiplexed_model_id()
        try:
            profile = (await self._current(person)) if person else None  # the store checks the id
            wav = self.p.read([audio], names=["request body"])
        except (ProfileError, ValueError) as err:  # AudioError is a ValueError
            return failure(err)
        probs = await asyncio.to_thread(self.p.probabilities, wav, profile)
        return {"status": 200, **self.p.records(probs, top_k)[0], "profile": person, "kind": self.p.kind, "base": self.p.digest}

    async def enroll(self, person: str, clips: list[bytes], labels: list[str], names: list[str], overwrite: bool) -> dict:
        try:  # enroll checks the id first
            profile = await asyncio.to_thread(self.p.enroll, clips, labels, person, None, overwrite, names)
        except (ProfileError, ValueError) as err:
            return failure(err)
        return {"status": 200, **profile.meta}

    async def profiles(self) -> dict:
        return {"status": 200, "base": self.p.digest,
                "profiles": [{**meta, "usable": meta.get("base") == self.p.digest and meta.get("kind") == self.p.kind}
                             for meta in self.p.store.list()]}

    async def health(self) -> dict:
        return {"status": 200, "kind": self.p.kind, "base": self.p.digest, "loaded": sorted(self.loaded),
                "loads": dict(self.loads), "peak_rss_mb": round(peak_mb(), 1)}


class _Loaded:
    """A loaded profile; `__del__` is what Serve's eviction amounts to (and Python's, later, again)."""

    def __init__(self, profile, stamp: int, loaded: dict):
        self.profile, self.stamp, self.loaded, self.person = profile, stamp, loaded, profile.person
        loaded[self.person] = id(self)

    def __del__(self):
        if self.loaded.get(self.person) == id(self):  # not a newer load of the same person
            del self.loaded[self.person]


def _person(person: str) -> str:
    """A profile id from a request, or 400 naming it (before any body is read)."""
    try:
        return check_id(person)
    except ProfileError as err:
        raise HTTPException(400, str(err)) from None


app = FastAPI(title="distmeta", description="Personalized speech emotion recognition: enroll people, predict their audio.")
bearer = HTTPBearer(auto_error=False)


@serve.deployment(ray_actor_options={"num_cpus": 0})  # it only awaits the model replicas
@serve.ingress(app)
class Ingress:
    def __init__(self, model, args: ServeArgs):
        self.model, self.args = model, args
        self.max_body = int(args.max_body_mb * 1024 * 1024)
        self.uploads = UploadLimits(max_members=2 * args.max_clips + 16)
        if not args.token:
            log.warning("distmeta serve: no token; anyone who can reach the HTTP port can enroll and predict")

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.args.token and not (credentials and hmac.compare_digest(credentials.credentials.encode(), self.args.token.encode())):
            raise HTTPException(401, "a valid token is needed: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _stream(self, request: Request):
        """The body as it streams in, refused (413) the moment it passes the limit, chunked or not."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise HTTPException(413, f"the body is over the limit of {self.max_body} bytes")
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise HTTPException(413, f"the body is over the limit of {self.max_body} bytes")
            yield chunk

    async def _body(self, request: Request) -> bytes:
        body = b"".join([chunk async for chunk in self._stream(request)])
        if not body:
            raise HTTPException(400, "empty body: send the audio file (predict) or the enrollment (enroll)")
        return body

    @staticmethod
    def _answer(answer: dict) -> dict:
        status = answer.pop("status")
        if status != 200:
            raise HTTPException(status, answer["detail"])
        return answer

    async def _predict(self, request: Request, person: str, top_k: int | None) -> dict:
        if top_k is not None and top_k < 1:
            raise HTTPException(400, "top_k must be at least 1")
        audio = await self._body(request)
        return self._answer(await self.model.options(multiplexed_model_id=person).predict.remote(audio, top_k))

    @app.post("/profiles/{person}/predict", openapi_extra=AUDIO_BODY)
    async def predict_profile(self, person: str, request: Request, top_k: int | None = None,
                              credentials=Depends(bearer)) -> dict:
        """Emotions of one clip, with a person's profile."""
        self._authorize(credentials)
        return await self._predict(request, _person(person), top_k)

    @app.post("/predict", openapi_extra=AUDIO_BODY)
    async def predict(self, request: Request, top_k: int | None = None, credentials=Depends(bearer)) -> dict:
        """Emotions of one clip; the profile in the header serve_multiplexed_model_id (none: unpersonalized)."""
        self._authorize(credentials)
        person = request.headers.get(HEADER, "")
        return await self._predict(request, _person(person) if person else "", top_k)

    async def _enroll(self, request: Request, person: str, overwrite: bool) -> dict:
        _person(person)
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await MultiPartParser(request.headers, self._stream(request), max_files=self.args.max_clips,
                                             max_fields=self.args.max_clips + 8, max_part_size=self.max_body).parse()
                files = form.getlist("clips")
                if any(isinstance(f, str) for f in files):
                    raise ValueError("`clips` must be files")
                clips = [await f.read() for f in files]
                labels, names = [str(v) for v in form.getlist("labels")], [f"clips[{i}] ({f.filename})"[:120] for i, f in enumerate(files)]
                if len(labels) != len(clips):
                    raise ValueError(f"{len(clips)} clips but {len(labels)} labels (one `labels` field per clip)")
            else:
                clips, labels, names = archive_enrollment(await self._body(request), self.uploads)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        except Exception as err:  # the form parser's own errors on a malformed form
            if isinstance(err, HTTPException):
                raise
            raise HTTPException(400, f"a malformed multipart form ({type(err).__name__})") from None
        return self._answer(await self.model.enroll.remote(person, clips, labels, names, overwrite))

    @app.post("/profiles/{person}/enroll")
    async def enroll_profile(self, person: str, request: Request, overwrite: bool = False, credentials=Depends(bearer)) -> dict:
        """Enroll a person: a tar (or .tar.gz) of labels.csv and its clips, or a multipart form (files `clips`,
        one `labels` field per clip). Over a profile of another kind or model only with overwrite=true."""
        self._authorize(credentials)
        return await self._enroll(request, person, overwrite)

    @app.post("/enroll")
    async def enroll(self, request: Request, person: str = "", overwrite: bool = False, credentials=Depends(bearer)) -> dict:
        """The same as POST /profiles/{person}/enroll, the person in ?person=ID."""
        self._authorize(credentials)
        if not person:
            raise HTTPException(400, "enroll needs ?person=ID")
        return await self._enroll(request, person, overwrite)

    @app.get("/profiles")
    async def profiles(self, credentials=Depends(bearer)) -> dict:
        """The store's profiles; `usable`: enrolled on the served base model."""
        self._authorize(credentials)
        return self._answer(await self.model.profiles.remote())

    @app.get("/health")
    async def health(self, credentials=Depends(bearer)) -> dict:
        """The served base model, the profiles loaded on the replica that answered, and peak memory."""
        self._authorize(credentials)
        return self._answer(await self.model.health.remote()) | {"ingress_peak_rss_mb": round(peak_mb(), 1)}


def application(args: ServeArgs):
    """The bound Serve application: the ingress in front of `args.replicas` model replicas."""
    if args.max_profiles < 1:
        raise ValueError(f"max_profiles must be at least 1, got {args.max_profiles}")
    args = args.model_copy(update={"token": args.token or os.environ.get("DISTMETA_TOKEN") or None})
    options = {"num_cpus": 1, "num_gpus": args.num_gpus}
    replica = ProfileModel.options(num_replicas=args.replicas, ray_actor_options=options).bind(args)
    return Ingress.bind(replica, args)


def build(args: ServeArgs):
    """The application builder `serve run distmeta.profiles.serve:build model=PATH` and a Serve config file's
    `import_path` name (its `args` are ServeArgs)."""
    return application(args)


def start(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve's HTTP proxy on host:port and run the application; returns its URL. A host other than
    loopback needs a token."""
    import ray

    token = args.token or os.environ.get("DISTMETA_TOKEN")
    if host not in LOOPBACK and not token:
        raise ValueError(f"--host {host} exposes the server beyond this machine: give --token (or $DISTMETA_TOKEN)")
    cpus, gpus = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    if args.replicas > cpus:  # Serve would wait forever for a CPU for the extra replicas
        raise ValueError(f"{args.replicas} model replicas need a CPU each; the Ray cluster has {cpus:g}")
    if args.replicas * args.num_gpus > gpus:
        raise ValueError(f"{args.replicas} model replicas of {args.num_gpus:g} GPU; the Ray cluster has {gpus:g} GPUs")
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(args), name="distmeta", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
