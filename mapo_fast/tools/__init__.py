"""Visual tools: batched crop-and-zoom on the device (as images or vision-encoder patches),
and the tool-call protocol (parser, registry, batched runner)."""

from .ops import (CLIP_MEAN, CLIP_STD, MAX_ASPECT, BoxError, check_box, crop_and_zoom,
                  crop_to_patches, crops_to_patches, smart_resize, zoom_size)
from .protocol import (ERROR_CODES, CropRequest, Tool, ToolArgumentError, ToolCall, ToolContext,
                       ToolRegistry, ToolResult, ToolRunner, ToolSession, ZoomInTool,
                       format_tool_call, parse_tool_calls)

__all__ = ["CLIP_MEAN", "CLIP_STD", "BoxError", "check_box", "crop_and_zoom", "crop_to_patches",
           "crops_to_patches",
           "smart_resize", "zoom_size", "MAX_ASPECT", "ERROR_CODES", "CropRequest", "Tool",
           "ToolArgumentError", "ToolCall",
           "ToolContext", "ToolRegistry", "ToolResult", "ToolRunner", "ToolSession",
           "ZoomInTool", "format_tool_call", "parse_tool_calls"]
