"""Connection files, profiles and the signed session every component shares.

Contract: the controller writes two JSON files into the profile's ``security/``
folder, ``ipcontroller[-<cluster_id>]-client.json`` for clients and
``ipcontroller[-<cluster_id>]-engine.json`` for engines, each readable by the owner
only (mode 0600). They hold the interface to connect to, every channel's port, the
HMAC key, the signature scheme and the task scheme.

The interface in the files is the controller's ``location`` (:func:`connect_address`):
where it binds (``ip``) unless that is every interface (``0.0.0.0`` or ``*``), in which
case it is this host's address that other hosts reach, never a loopback address;
``IPController.location`` names it outright (a host name, a NAT's address). The same engine information can travel in the
``IPP_LITE_CONNECTION_INFO`` environment variable as JSON, for machines that share no
file system.

CurveZMQ (opt-in, ``IPController.enable_curve``): the controller's sockets are CURVE
servers with a keypair made at its start, and the files carry its public key as
``curve_serverkey``. A client or engine that finds one makes its own keypair at
connect time (:func:`curve_client_options`) and encrypts every connection with it. The
files hold no client secret: the controller authenticates messages by their HMAC
signature, not by CURVE client keys, so a stored client key would protect nothing more.
The controller keeps its own keypair in a third 0600 file, ``...-curve.json``, so that
``--restore`` comes back with the key clients and engines know.

The ``mux`` channel, a C device that routes by frames no signature covers, lets in only
peers that hold the key (:func:`mux_client_options`, :func:`mux_server_options`): a
password derived from it (ZMQ's PLAIN mechanism), or with CURVE a client keypair derived
from it, checked by the controller's ZAP handler when a peer connects. A peer without
the key never gets a frame to the device. The HMAC key itself never travels.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import uuid
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.session import Session
from zmq.utils import z85

from ipyparallel_lite import batch
from ipyparallel_lite.fastzmq import frame_bytes
from ipyparallel_lite.session import LeanSession

CONNECTION_INFO_ENV = "IPP_LITE_CONNECTION_INFO"

#: channels a client connects to, and the engine-facing ones
CLIENT_CHANNELS = ("registration", "notification", "mux", "task", "broadcast", "control", "iopub")
ENGINE_CHANNELS = ("registration", "shell", "mux", "control", "iopub", "hb_ping", "hb_pong")

#: the routing identity before a load-balanced task's message on an engine's shell
#: channel (the controller's tag for its scheduler's tasks)
TASK_IDENT = b"t"
#: the same, for a task its engine holds alone, whose client takes replies on its mux
#: socket: the engine sends its success straight there, through the mux device, and
#: the controller learns of it from the device's copy (see docs/wire.md)
LONE_TASK_IDENT = b"T"
#: the metadata key of a load-balanced task that its client sent straight to an engine,
#: through the mux device (a claim). ``true``: a lone claim, for the engine that answered
#: the client's last request while the client had nothing else in flight.
#: :data:`QUEUED_CLAIM`: the client placed it behind its own claims on that engine, as
#: many as the ``connection_reply``'s ``claims`` (the scheduler's hwm) and the prefetch
#: rule allow (prefetch.py). The engine treats it as a task (a steal request may take
#: it back), the controller places it there from the device's copy (see docs/wire.md)
CLAIM = "claim"
#: the value of :data:`CLAIM` for a claim placed behind others
QUEUED_CLAIM = "queued"


def is_claim(metadata: object) -> bool:
    """Whether a request's metadata marks it as a claim (see :data:`CLAIM`)."""
    return isinstance(metadata, dict) and bool(metadata.get(CLAIM))


def is_lone_claim(metadata: object) -> bool:
    """Whether a claim's client believed the engine idle (see :data:`CLAIM`)."""
    return isinstance(metadata, dict) and metadata.get(CLAIM) is True


#: what a client's zmq identity starts with (after batch.READER_PREFIX) when all its
#: sockets share it: an engine may then send that client a load-balanced task's reply
#: through the mux device, which routes by identity (see :data:`LONE_TASK_IDENT`)
SHARED_IDENTITY = batch.READER_PREFIX + b"shared:"


def shared_identity() -> bytes:
    """A new zmq identity for all of one client's sockets (see :data:`SHARED_IDENTITY`)."""
    return SHARED_IDENTITY + uuid.uuid4().hex.encode()


def takes_replies_on_mux(identity: bytes) -> bool:
    """Whether the client with this identity reads load-balanced replies on its mux socket."""
    return identity.startswith(SHARED_IDENTITY)


#: how many load-balanced tasks an engine remembers having begun, to answer a steal
#: request. One begun earlier is named as not begun: a controller that reads replies
#: late can still ask for it, so it takes the answer only once the replies of the tasks
#: begun before this window are in (controller.scheduler, "Adaptive prefetch").
STEAL_WINDOW = 1024


#: a controller's files in its profile's ``security/`` folder: the two connection files,
#: and (with CURVE) its own keypair, kept for ``--restore`` and never given to anyone
CONTROLLER_FILES = ("client", "engine", "curve")

#: the connection-file field holding the controller's CURVE public key (Z85 text)
CURVE_SERVERKEY = "curve_serverkey"
#: notifications that may wait for one client, at the controller and again at the client
#: (zmq's default is 1,000 each): a PUB drops what a subscriber cannot take, and 2,000
#: engines lost together are 2,000 notifications at once, after which a client that
#: missed some listed engines long gone. Each is a few hundred bytes.
NOTIFICATION_HWM = 100_000


def require_curve() -> None:
    """Raise RuntimeError, saying what to do, if libzmq was built without CURVE."""
    if not zmq.has("curve"):
        raise RuntimeError(
            f"CurveZMQ encryption is asked for (--curve / enable_curve, or a connection file "
            f"with a {CURVE_SERVERKEY}), but the libzmq {zmq.zmq_version()} under pyzmq "
            f"{zmq.__version__} was built without CURVE. Install pyzmq from its wheels (they "
            "bundle a libzmq with CURVE), or build libzmq with libsodium."
        )


def curve_server_options(secret_key: bytes) -> dict[int, Any]:
    """Socket options making a socket a CURVE server with ``secret_key`` (set before bind)."""
    return {zmq.CURVE_SERVER: 1, zmq.CURVE_SECRETKEY: secret_key}


def curve_client_options(info: dict) -> dict[int, Any]:
    """Socket options making a socket a CURVE client of the controller ``info`` names.

    Empty when the controller does not encrypt. A fresh client keypair per call: call
    once per process and apply the result to each socket (set before connect).
    """
    server_key = info.get(CURVE_SERVERKEY)
    if not server_key:
        return {}
    require_curve()
    public, secret = zmq.curve_keypair()
    return {zmq.CURVE_SERVERKEY: server_key.encode("ascii"), zmq.CURVE_PUBLICKEY: public,
            zmq.CURVE_SECRETKEY: secret}


#: the ZAP domain of the mux device's sockets, whose peers must prove they hold the key
MUX_ZAP_DOMAIN = b"ipp-lite-mux"
#: the PLAIN user name peers of the mux device give (only the password is checked)
MUX_PLAIN_USER = b"ipp-lite"


def _mux_peer_options(key: str | bytes, curve: bool) -> dict[int, Any]:
    """A mux peer's credentials, all derived from the cluster's ``key`` (only its holders
    can compute them): PLAIN user and password, or a CURVE client keypair."""
    key = key.encode() if isinstance(key, str) else key
    secret = hmac.new(key, b"ipyparallel_lite mux channel", hashlib.sha256).digest()
    if not curve:
        return {zmq.PLAIN_USERNAME: MUX_PLAIN_USER, zmq.PLAIN_PASSWORD: secret.hex().encode("ascii")}
    secret_z85 = z85.encode(secret)
    return {zmq.CURVE_PUBLICKEY: zmq.curve_public(secret_z85), zmq.CURVE_SECRETKEY: secret_z85}


def mux_credentials(key: str | bytes, curve: bool) -> tuple[bytes, bytes]:
    """What the controller's ZAP handler expects from a peer of the mux device:
    ``(b"PLAIN", password)``, or with CURVE ``(b"CURVE", client_public_key)`` (binary)."""
    options = _mux_peer_options(key, curve)
    if curve:
        return b"CURVE", z85.decode(options[zmq.CURVE_PUBLICKEY])
    return b"PLAIN", options[zmq.PLAIN_PASSWORD]


def mux_client_options(info: dict) -> dict[int, Any]:
    """Socket options for a client's or an engine's ``mux`` socket (set before connect):
    the credentials the device's ZAP handler checks, derived from ``info["key"]``."""
    server_key = info.get(CURVE_SERVERKEY)
    if not server_key:
        return _mux_peer_options(info["key"], curve=False)
    require_curve()
    return {zmq.CURVE_SERVERKEY: server_key.encode("ascii"),
            **_mux_peer_options(info["key"], curve=True)}


def mux_server_options(server_options: dict[int, Any]) -> dict[int, Any]:
    """The mux device's socket options: the controller's ``server_options`` (CURVE or
    not), PLAIN without CURVE, and every connection checked by the ZAP handler, which
    must be bound first (with no handler, libzmq refuses rather than lets in)."""
    options = {**server_options, zmq.ZAP_DOMAIN: MUX_ZAP_DOMAIN, zmq.ZAP_ENFORCE_DOMAIN: 1}
    if zmq.CURVE_SERVER not in server_options:
        options[zmq.PLAIN_SERVER] = 1
    return options


#: the connection-file field holding the largest message part the controller reads
MAX_MESSAGE_BYTES = "max_message_bytes"


class MessageTooLarge(ValueError):
    """A message has a part bigger than the controller reads (``max_message_bytes``)."""


def check_message_size(frames: list, limit: int | None, what: str = "message") -> None:
    """Raise :class:`MessageTooLarge` if a frame of ``frames`` exceeds ``limit`` bytes.

    The controller's sockets have zmq's MAXMSGSIZE set to its ``max_message_bytes``:
    libzmq drops the connection of a peer that sends a bigger part, before buffering
    it, so such a message would vanish without an answer. Checking here, before the
    send, turns that into an error naming both sizes. ``limit`` None or 0: no limit.
    """
    if not limit:
        return
    largest = 0
    for frame in frames:  # on every send: bytes (the signed parts) without a memoryview
        size = len(frame) if type(frame) is bytes else memoryview(frame).nbytes
        if size > largest:
            largest = size
    if largest > limit:
        raise MessageTooLarge(
            f"{what} of {largest / 2**20:.1f} MB exceeds the controller's max_message_bytes="
            f"{limit} ({limit / 2**20:.1f} MB), the largest part of a message it reads; nothing "
            "was sent. Send the data in smaller pieces (e.g. scatter, or several pushes), or "
            "start the controller with a larger --IPController.max_message_bytes."
        )


def controller_window(info: dict) -> float:
    """Seconds a controller may be silent before it counts as gone: its heartbeat window
    (``hb_period * hb_max_misses``), the one it gives engines."""
    return float(info.get("hb_period", 1.0)) * int(info.get("hb_max_misses", 5))


def heartbeat_options(info: dict, timeout: float) -> dict[int, Any]:
    """ZMTP heartbeat options for a socket connected to the controller ``info`` names:
    a ping every heartbeat period, the connection dropped after ``timeout`` seconds
    without an answer (libzmq answers pings in its own thread, so a busy peer does)."""
    period = float(info.get("hb_period", 1.0))
    return {zmq.HEARTBEAT_IVL: max(1, int(period * 1000)),
            zmq.HEARTBEAT_TIMEOUT: max(1, int(timeout * 1000))}


def set_options(sock: zmq.Socket, options: dict[int, Any]) -> zmq.Socket:
    """Apply socket options (such as the CURVE ones above); returns ``sock``."""
    for option, value in options.items():
        sock.setsockopt(option, value)
    return sock


def set_device_options(device: Any, options: dict[int, Any]) -> None:
    """Apply socket options to both sides of a ``zmq.devices`` device (before it starts)."""
    for option, value in options.items():
        device.setsockopt_in(option, value)
        device.setsockopt_out(option, value)


def new_key() -> str:
    """A fresh HMAC key for a cluster."""
    return secrets.token_hex(32)


def make_session(key: str | bytes, *, username: str = "ipp-lite", session_class: type[Session] = LeanSession,
                 **kwargs: Any) -> Session:
    """The signing session (a :class:`~ipyparallel_lite.session.LeanSession` unless told):
    HMAC-SHA256 over header, parent, metadata and content."""
    if isinstance(key, str):
        key = key.encode("ascii")
    if not key:
        raise ValueError("refusing to create an unsigned session: the connection key is empty")
    return session_class(key=key, signature_scheme="hmac-sha256", username=username, **kwargs)


def unpack_message(session: LeanSession, frames: list, content: bool = True,
                   parent: bool = True) -> dict:
    """Verify and unpack ``[signature, header, parent, metadata, content, *buffers]``.

    The same checks as ``Session.deserialize`` (signature, replays), minus turning
    header dates into datetimes, which costs more than the rest of a hop. Dates stay
    ISO strings; buffers stay the frames they arrived as (zero-copy). Raises
    ``ValueError`` for an unsigned, replayed or forged message. ``content`` or
    ``parent`` False: that part stays the verified bytes, not decoded (a reader that
    does not need it saves the JSON parse).
    """
    if len(frames) < 5:
        raise ValueError(f"malformed message: {len(frames)} frames, at least 5 needed")
    raw = [frame_bytes(f) for f in frames[:5]]
    unpack = session.verify(raw)
    header = unpack(raw[1])
    return {
        "header": header,
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
        "parent_header": unpack(raw[2]) if parent else raw[2],
        "metadata": unpack(raw[3]),
        "content": unpack(raw[4]) if content else raw[4],
        "buffers": list(frames[5:]),
    }


def reply_type(msg_type: str) -> str:
    """The reply's msg_type for a request's: ``apply_request`` -> ``apply_reply``."""
    return (msg_type[: -len("_request")] if msg_type.endswith("_request") else msg_type) + "_reply"


def ipython_dir() -> Path:
    from IPython.paths import get_ipython_dir

    return Path(get_ipython_dir())


def profile_dir(profile: str = "default", ipython_dir_path: str | Path | None = None,
                profile_dir_path: str | Path | None = None) -> Path:
    """The profile folder (IPython's ``ProfileDir``), created with a private ``security/``."""
    from ipyparallel_lite.config import find_profile_dir

    return find_profile_dir(profile, ipython_dir_path, profile_dir_path)


def connection_file_path(
    kind: str,
    profile: str = "default",
    cluster_id: str = "",
    ipython_dir_path: str | Path | None = None,
    profile_dir_path: str | Path | None = None,
) -> Path:
    """Where the ``client`` or ``engine`` connection file of a cluster lives, or (``curve``)
    the controller's CURVE keypair."""
    if kind not in CONTROLLER_FILES:
        raise ValueError(f"connection file kind must be one of {CONTROLLER_FILES}, not {kind!r}")
    name = f"ipcontroller-{cluster_id}-{kind}.json" if cluster_id else f"ipcontroller-{kind}.json"
    return profile_dir(profile, ipython_dir_path, profile_dir_path) / "security" / name


def write_private_file(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` with mode 0600 from the first byte on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


#: ``IPController.ip`` values that bind every interface
ALL_INTERFACES = ("*", "0.0.0.0")


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP address, or ``localhost``) is this host's loopback."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def reachable_address() -> str:
    """An IPv4 address of this host that other hosts can reach (not loopback).

    The one its host name resolves to, else the first such address of its interfaces;
    ValueError when it has none.
    """
    import psutil

    try:
        named = socket.gethostbyname(socket.gethostname())
    except OSError:
        named = ""
    if named and not is_loopback(named):
        return named
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback \
                    and not ipaddress.ip_address(a.address).is_link_local:
                return a.address
    raise ValueError("this host has no address other hosts can reach (only loopback); "
                     "bind the controller to 127.0.0.1, or name its address with --location")


def connect_address(ip: str, location: str = "") -> str:
    """Where clients and engines connect to a controller bound to ``ip``: ``location``
    when given, this host's reachable address when ``ip`` is every interface, else ``ip``."""
    if location:
        return location
    if ip in ALL_INTERFACES:
        return reachable_address()
    return ip


def write_connection_file(path: str | Path, info: dict) -> Path:
    return write_private_file(path, json.dumps(info, indent=2))


def load_connection_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"No connection file at {path}. Is a cluster running? "
            "Start one with `ipcluster-lite start` or `ipp.Cluster().start_cluster_sync()`."
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"Connection file {path} is not valid JSON ({e}).") from None
    missing = [k for k in ("interface", "key", "ports") if k not in info]
    if missing:
        raise ValueError(f"Connection file {path} lacks {', '.join(missing)}.")
    return info


def url(info: dict, channel: str) -> str:
    """The zmq URL of a channel named in a connection file."""
    return f"{info['interface']}:{info['ports'][channel]}"
