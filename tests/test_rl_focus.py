"""The crop-mode focus hook crops the named region of the right prompt, batched in one crop_boxes call."""

from dataclasses import dataclass

import pytest
import torch

import engine.data.focus as focus
from engine.data.depth_colormap import spectral_r_palette
from engine.data.focus import CropFocusHook

AREA_TOP_RIGHT = '<think><area>[{"bbox_2d":[0.5,0.0,1.0,0.5],"depth":0.2}]</area>'


@dataclass
class Request:
    prompt_index: int
    sample_index: int
    completion_text: str


def _quadrants(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [h, w, 3] with a different colour per quadrant, and depth 0.2 top-right / 0.6 elsewhere."""
    img = torch.zeros(h, w, 3, dtype=torch.uint8)
    img[: h // 2, : w // 2] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    img[: h // 2, w // 2 :] = torch.tensor([0, 255, 0], dtype=torch.uint8)
    img[h // 2 :, : w // 2] = torch.tensor([0, 0, 255], dtype=torch.uint8)
    img[h // 2 :, w // 2 :] = torch.tensor([51, 102, 153], dtype=torch.uint8)
    depth = torch.full((h, w), 0.6)
    depth[: h // 2, w // 2 :] = 0.2
    return img, depth


def test_crops_the_named_region_of_each_prompt_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = focus.crop_boxes

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(focus, "crop_boxes", counting)
    small, small_depth = _quadrants(4, 4)
    big, big_depth = _quadrants(8, 6)  # a different size: padded into one batch
    hook = CropFocusHook([small, big], [small_depth, big_depth], crop_size=(2, 2), max_views=4)
    bottom_left = '<area>[{"bbox_2d":[0.0,0.5,0.5,1.0],"depth":0.6}]</area>'
    views = hook([Request(0, 0, AREA_TOP_RIGHT), Request(1, 3, "<think>" + bottom_left), Request(1, 1, "no area")])
    assert calls == [2]
    assert views[2] is None
    rgb0, depth0 = views[0]
    torch.testing.assert_close(rgb0, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 2, 2))
    palette = torch.from_numpy(spectral_r_palette().copy())
    # depth 0.2 -> palette entry round((1 − 0.2)·255) = 204; depth 0.6 -> 102
    assert torch.equal(depth0, palette[204].expand(2, 2, 3))
    rgb1, depth1 = views[1]
    torch.testing.assert_close(rgb1, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, 2))
    assert torch.equal(depth1, palette[102].expand(2, 2, 3))


def test_view_budget_invalid_boxes_and_rgb_only() -> None:
    img, _ = _quadrants(4, 4)
    hook = CropFocusHook([img], [None], crop_size=(2, 2), max_views=2)
    three = (
        '<think><area>[{"bbox_2d":[0.0,0.0,0.5,0.5],"depth":0.1},{"bbox_2d":[0.5,0.0,1.0,0.5],"depth":0.1},'
        '{"bbox_2d":[0.0,0.5,0.5,1.0],"depth":0.1}]</area>'
    )
    first = hook([Request(0, 0, three)])[0]
    assert len(first) == 2  # capped at max_views, RGB only (no depth map)
    torch.testing.assert_close(first[0][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(first[1][:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert hook([Request(0, 0, three + "<text>t</text>" + three[7:])]) == [None]  # budget spent
    assert len(hook([Request(0, 1, three)])[0]) == 2  # another sample has its own budget
    assert hook.num_views == 4


def test_an_area_without_a_valid_box_shows_the_whole_image() -> None:
    """Crop-mode SFT always follows ``</area>`` with views; a degenerate or unreadable area gets the whole image, so
    the policy is never left to sample the token after ``</area>`` that it was never trained to predict."""
    img, depth = _quadrants(4, 4)
    hook = CropFocusHook([img], [depth], crop_size=(2, 2), max_views=2)
    degenerate = '<think><area>[{"bbox_2d":[0.6,0.0,0.2,0.5],"depth":0.1}]</area>'  # x2 < x1
    unreadable = "<think><area>[{bbox</area> "
    for sample, text in enumerate((degenerate, unreadable)):
        (views,) = hook([Request(0, sample, text)])
        rgb, depth_view = views
        torch.testing.assert_close(rgb, img.permute(2, 0, 1).float()[:, ::2, ::2] / 255, atol=0.3, rtol=0)
        assert rgb.shape == (3, 2, 2) and depth_view.shape == (2, 2, 3)
        torch.testing.assert_close(rgb[:, 0, 1], torch.tensor([0.0, 1.0, 0.0]))  # top-right quadrant: green
    assert hook([Request(0, 3, "no area yet")]) == [None]
    assert hook.num_views == 2
    spent = CropFocusHook([img], [depth], crop_size=(2, 2), max_views=1)
    assert len(spent([Request(0, 0, AREA_TOP_RIGHT)])[0]) == 2
    assert spent([Request(0, 0, AREA_TOP_RIGHT + "<text>t</text>" + degenerate[7:])]) == [None]  # budget spent


def test_bad_inputs_are_named() -> None:
    img, depth = _quadrants(4, 4)
    with pytest.raises(ValueError, match="depth 0"):
        CropFocusHook([img], [depth[:2]])
    with pytest.raises(ValueError, match="image 0"):
        CropFocusHook([img.float()], [depth])
