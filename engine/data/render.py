"""Numpy ray caster for the synthetic scenes: pinhole camera, spheres / yawed cubes / upright cylinders on a tiled
floor, z-buffered first hits (occlusion), Lambert + ambient shading, distance fog, and exact view-space depth.

World: X right, Y up, Z forward, floor at Y = 0. ``render`` returns uint8 RGB [H, W, 3], depth float32 [H, W]
(view-space z of the first hit, the sky at ``z_far``, min–max normalised so 0 = nearest, 1 = far plane), the
object-id buffer and per-object unoccluded pixel counts (for visibility checks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("sphere", "cube", "cylinder")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.13, 0.13),
    "green": (0.13, 0.66, 0.2),
    "blue": (0.15, 0.3, 0.92),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.56, 0.2, 0.76),
    "cyan": (0.1, 0.8, 0.85),
    "orange": (0.96, 0.5, 0.08),
    "white": (0.93, 0.93, 0.93),
}
SKY = np.array([0.62, 0.78, 0.95])
FLOOR = (np.array([0.55, 0.53, 0.5]), np.array([0.42, 0.4, 0.38]))


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: world X right, Y up, Z forward; image u right, v down; ``f`` in pixels."""

    width: int
    height: int
    f: float
    position: tuple[float, float, float]
    right: tuple[float, float, float]
    down: tuple[float, float, float]
    forward: tuple[float, float, float]

    @staticmethod
    def make(width: int, height: int, fov_deg: float, cam_height: float, pitch_deg: float) -> Camera:
        """Camera at (0, cam_height, 0) looking along +Z, pitched down by ``pitch_deg``; horizontal FOV."""
        p = math.radians(pitch_deg)
        f = (width / 2) / math.tan(math.radians(fov_deg) / 2)
        return Camera(
            width,
            height,
            f,
            (0.0, cam_height, 0.0),
            (1.0, 0.0, 0.0),
            (0.0, -math.cos(p), -math.sin(p)),
            (0.0, -math.sin(p), math.cos(p)),
        )

    def project(self, point: np.ndarray) -> tuple[float, float, float]:
        """(u, v, z_view) of a world point."""
        rel = np.asarray(point, dtype=np.float64) - np.asarray(self.position)
        z = float(_dot(rel, self.forward))
        u = self.width / 2 + self.f * float(_dot(rel, self.right)) / z
        v = self.height / 2 + self.f * float(_dot(rel, self.down)) / z
        return u, v, z


@dataclass
class SceneObject:
    """One object. ``size``: sphere radius / cube half-edge / cylinder radius; ``half_height`` for cylinders."""

    shape: str
    color: str
    center: tuple[float, float, float]
    size: float
    half_height: float
    yaw: float = 0.0
    box: list[float] = field(default_factory=list)
    visible_pixels: int = 0
    visible_depth: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def volume(self) -> float:
        if self.shape == "sphere":
            return 4.0 / 3.0 * math.pi * self.size**3
        if self.shape == "cube":
            return (2.0 * self.size) ** 3
        return math.pi * self.size**2 * 2.0 * self.half_height


def _dot(a: np.ndarray, v) -> np.ndarray:
    """Dot product over the last axis (size 3) written out elementwise: bit-identical on every CPU, unlike BLAS."""
    a = np.asarray(a, dtype=np.float64)
    return a[..., 0] * v[0] + a[..., 1] * v[1] + a[..., 2] * v[2]


def _rotate(a: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """``rot @ a`` for every 3-vector in ``a`` [..., 3], elementwise (see :func:`_dot`)."""
    return np.stack([_dot(a, rot[k]) for k in range(3)], axis=-1)


def _rays(cam: Camera) -> np.ndarray:
    """Unit ray directions [H*W, 3] through pixel centres."""
    v, u = np.mgrid[0 : cam.height, 0 : cam.width].astype(np.float64)
    x = (u.reshape(-1) + 0.5 - cam.width / 2) / cam.f
    y = (v.reshape(-1) + 0.5 - cam.height / 2) / cam.f
    d = x[:, None] * np.asarray(cam.right) + y[:, None] * np.asarray(cam.down) + np.asarray(cam.forward)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _hit_sphere(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    oc = o - np.asarray(obj.center)
    b = _dot(d, oc)
    disc = b * b - (_dot(oc, oc) - obj.size**2)
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    return np.where((disc >= 0) & (t > 1e-6), t, np.inf)


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])  # object-to-world rotation about Y


def _hit_cube(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    rot = _yaw_matrix(obj.yaw)
    ol = _rotate(o - np.asarray(obj.center), rot.T)  # world to object frame
    dl = _rotate(d, rot.T)
    dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    t1 = (-obj.size - ol) / dl
    t2 = (obj.size - ol) / dl
    tmin = np.minimum(t1, t2).max(axis=1)
    tmax = np.maximum(t1, t2).min(axis=1)
    return np.where((tmax >= tmin) & (tmin > 1e-6), tmin, np.inf)


def _hit_cylinder(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> np.ndarray:
    c = np.asarray(obj.center)
    oc = o - c
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = d[:, 0] * oc[0] + d[:, 2] * oc[2]
    cc = oc[0] ** 2 + oc[2] ** 2 - obj.size**2
    disc = b * b - a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        y = oc[1] + t_side * d[:, 1]
        t_side = np.where((disc >= 0) & (a > 1e-12) & (t_side > 1e-6) & (np.abs(y) <= obj.half_height), t_side, np.inf)
        t_cap = np.full(len(d), np.inf)
        for cap in (obj.half_height, -obj.half_height):
            t = (cap - oc[1]) / d[:, 1]
            px = oc[0] + t * d[:, 0]
            pz = oc[2] + t * d[:, 2]
            ok = (t > 1e-6) & (px * px + pz * pz <= obj.size**2)
            t_cap = np.where(ok, np.minimum(t_cap, t), t_cap)
    return np.minimum(t_side, t_cap)


def _normals(obj: SceneObject, p: np.ndarray) -> np.ndarray:
    rel = p - np.asarray(obj.center)
    if obj.shape == "sphere":
        n = rel
    elif obj.shape == "cube":
        rot = _yaw_matrix(obj.yaw)
        local = _rotate(rel, rot.T)
        axis = np.abs(local).argmax(axis=1)
        nl = np.zeros_like(local)
        nl[np.arange(len(local)), axis] = np.sign(local[np.arange(len(local)), axis])
        n = _rotate(nl, rot)
    else:
        on_cap = np.abs(np.abs(rel[:, 1]) - obj.half_height) < 1e-4
        n = np.where(on_cap[:, None], np.stack([0 * rel[:, 0], np.sign(rel[:, 1]), 0 * rel[:, 0]], 1), rel * [1, 0, 1])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


_HIT = {"sphere": _hit_sphere, "cube": _hit_cube, "cylinder": _hit_cylinder}


@dataclass
class Rendered:
    """Render outputs (see the module docstring)."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W] in [0, 1], 0 = nearest
    z: np.ndarray  # float32 [H, W] view-space depth in metres (sky: z_far)
    ids: np.ndarray  # int16 [H, W]: object index, -1 floor, -2 sky
    unoccluded: np.ndarray  # int64 [n_objects] pixel counts of each object rendered alone
    touches_border: np.ndarray  # bool [n_objects]: the object alone reaches the image border


def render(objects: list[SceneObject], cam: Camera, light: np.ndarray, z_far: float) -> Rendered:
    """Ray-cast the scene: z-buffered first hits, Lambert + ambient shading, fog; exact normalised depth."""
    h, w = cam.height, cam.width
    o = np.asarray(cam.position, dtype=np.float64)
    d = _rays(cam)
    t_all = np.stack([_HIT[obj.shape](o, d, obj) for obj in objects]) if objects else np.empty((0, h * w))
    with np.errstate(divide="ignore"):
        t_floor = np.where(d[:, 1] < -1e-9, -o[1] / d[:, 1], np.inf)
    t_stack = np.vstack([t_all, t_floor[None]])
    first = t_stack.argmin(axis=0)
    t = t_stack[first, np.arange(h * w)]
    sky = ~np.isfinite(t)
    ids = np.where(sky, -2, np.where(first == len(objects), -1, first)).astype(np.int16)

    z = np.where(sky, z_far, t * _dot(d, cam.forward))
    z = np.minimum(z, z_far)
    color = np.empty((h * w, 3))
    color[sky] = SKY
    p = o + np.where(sky, 0.0, t)[:, None] * d
    floor = ids == -1
    tiles = (np.floor(p[floor, 0]) + np.floor(p[floor, 2])).astype(np.int64) % 2
    color[floor] = np.where(tiles[:, None] == 0, FLOOR[0], FLOOR[1])
    for k, obj in enumerate(objects):
        m = ids == k
        if m.any():
            shade = 0.35 + 0.65 * np.clip(_dot(_normals(obj, p[m]), light), 0.0, 1.0)
            color[m] = np.asarray(COLORS[obj.color]) * shade[:, None]
    zn = np.clip(z / z_far, 0.0, 1.0)[:, None]
    fog = zn * np.sqrt(zn) * 0.6  # (z / z_far)^1.5 from IEEE-exact ops (np.power's SIMD paths vary by CPU)
    color = color * (1 - fog) + SKY * fog
    rgb = np.clip(np.round(color * 255.0), 0, 255).astype(np.uint8).reshape(h, w, 3)

    zmin = float(z.min())
    depth = ((z - zmin) / max(z_far - zmin, 1e-9)).astype(np.float32).reshape(h, w)
    alone = np.isfinite(t_all).reshape(len(objects), h, w)
    border = alone[:, 0, :].any(1) | alone[:, -1, :].any(1) | alone[:, :, 0].any(1) | alone[:, :, -1].any(1)
    z_map = z.astype(np.float32).reshape(h, w)
    return Rendered(rgb, depth, z_map, ids.reshape(h, w), alone.reshape(len(objects), -1).sum(1), border)
