"""Five-point alignment to the ArcFace 112x112 reference template.

Identical to ``insightface.utils.face_align.norm_crop`` (same template, same
least-squares similarity transform, same ``cv2.warpAffine`` call), written
without scikit-image so the CPU decode stage of the offline job stays light.
"""

from __future__ import annotations

import cv2
import numpy as np

# Landmark order: left eye, right eye, nose tip, left mouth corner, right mouth
# corner (image left/right), in pixels of a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


LANDMARK_NAMES = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")
MIN_LANDMARK_SPAN_PX = 1.0


def check_landmarks(kps: np.ndarray, image_shape: tuple[int, ...]) -> None:
    """Refuse landmarks that cannot describe a face in an image of ``image_shape``.

    One rule set for every caller (the service answers 422, the job records a per-row
    error), so the same landmarks are never rejected online and embedded offline. Three
    rules, each a ``ValueError`` whose message names the point: every point lies within
    the image extended by its own width/height on each side (a face cut by the border has
    points a little outside; one a whole image size away is no coordinate in it, and huge
    values would overflow the float32 transform); the face centre (mean of the 5 points)
    lies inside the image (else the crop is black border); the points span at least
    ``MIN_LANDMARK_SPAN_PX`` (coincident points have no similarity transform; fractions
    of the image size would blow a sub-pixel patch up to 112x112).
    """
    kps = np.asarray(kps, dtype=np.float64)  # float64: huge values are "far outside", not inf
    if kps.shape != (5, 2):
        raise ValueError(f"landmarks must be 5 (x, y) points with shape (5, 2), got shape {kps.shape}")
    if not np.isfinite(kps).all():
        raise ValueError("landmarks contain NaN or infinite values")
    h, w = image_shape[:2]
    size = f"{w}x{h}"
    for i, (x, y) in enumerate(kps):
        if not (-w <= x <= 2 * w and -h <= y <= 2 * h):
            raise ValueError(
                f"landmark {i} ({LANDMARK_NAMES[i]}) at ({x:.6g}, {y:.6g}) is far outside "
                f"the {size} image; landmarks are pixel coordinates in the image they come with"
            )
    cx, cy = kps.mean(axis=0)
    if not (0 <= cx <= w and 0 <= cy <= h):
        raise ValueError(
            f"the face centre (mean of the 5 landmarks) at ({cx:.6g}, {cy:.6g}) is outside the {size} image"
        )
    span_x, span_y = np.ptp(kps, axis=0)
    if max(span_x, span_y) < MIN_LANDMARK_SPAN_PX:
        raise ValueError(
            f"landmarks are degenerate: the 5 points span only {span_x:.3g} x {span_y:.3g} px "
            f"(at least {MIN_LANDMARK_SPAN_PX:g} px needed); they must be distinct pixel coordinates, "
            "not fractions of the image size"
        )


def _as_landmarks(landmarks: object) -> np.ndarray:
    # float32 on purpose: insightface's detectors emit float32 keypoints and
    # scikit-image estimates in the input dtype, so matching it bit for bit
    # means doing the same arithmetic in the same precision.
    kps = np.asarray(landmarks, dtype=np.float32)
    if kps.shape != (5, 2):
        raise ValueError(
            f"landmarks must be 5 (x, y) points with shape (5, 2), got shape {kps.shape}"
        )
    if not np.isfinite(kps).all():
        raise ValueError("landmarks contain NaN or infinite values")
    return kps


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation).

    Umeyama (1991), step for step as ``skimage.transform.SimilarityTransform``
    computes it (same dtype handling, same rank test), so crops match
    insightface's ``norm_crop`` exactly. Returns the 3x3 homogeneous matrix.
    """
    src = np.asarray(src)
    dst = np.asarray(dst)
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    cov = dst_demean.T @ src_demean / num
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(cov) < 0:
        d[dim - 1] = -1
    transform = np.eye(dim + 1, dtype=np.float64)
    u, s, v = np.linalg.svd(cov)
    tol = s.max() * max(cov.shape) * np.finfo(float).eps
    rank = int(np.count_nonzero(s > tol))
    if rank == 0:
        raise ValueError("landmarks are degenerate (all points coincide)")
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            transform[:dim, :dim] = u @ v
        else:
            saved = d[dim - 1]
            d[dim - 1] = -1
            transform[:dim, :dim] = u @ np.diag(d) @ v
            d[dim - 1] = saved
    else:
        transform[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
    transform[:dim, dim] = dst_mean - scale * (transform[:dim, :dim] @ src_mean.T)
    transform[:dim, :dim] *= scale
    return transform


def estimate_norm(landmarks: object, image_size: int = 112) -> np.ndarray:
    """2x3 affine matrix taking ``landmarks`` onto the template scaled to ``image_size``."""
    kps = _as_landmarks(landmarks)
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}")
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += diff_x
    return umeyama_similarity(kps, dst)[0:2, :]


def norm_crop(image: np.ndarray, landmarks: object, image_size: int = 112) -> np.ndarray:
    """Warp ``image`` (H, W, 3) so its five landmarks land on the ArcFace template."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be an (H, W, 3) array, got shape {shape}")
    matrix = estimate_norm(landmarks, image_size)
    return cv2.warpAffine(image, matrix, (image_size, image_size), borderValue=0.0)
