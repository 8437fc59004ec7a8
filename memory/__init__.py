"""Conversation memory: conversations, content-addressed media, crash-safe resumable runs, recall.

```python
from agent import Agent
from memory import Store, recall_tool

with Store("chat.db") as store:  # or "postgresql+psycopg://user@host/db"
    agent = Agent(model, tools=[recall_tool()], memory=store)
    first = agent.run_sync("Remember this photo", images=["cat.png"])
    agent.run_sync("What was in it?", conversation_id=first.conversation_id)
    for run in store.list_runs(status="running"):  # after a crash: continue interrupted runs
        asyncio.run(agent.resume(run.id))
```

Each step of a run is committed in one transaction as it completes; `Agent.resume(run_id)` continues from
the last committed step without repeating a tool call whose result was committed. Images and audio are
stored once per sha256 however often they appear. A run holds its conversation's lease until it ends, so
runs on one conversation take turns across threads and processes; one that waits past
`Store(lease_wait=...)` raises `agent.exceptions.ConversationBusyError`.

The same store keeps ingested media (`agent.ingest` fills it): collections of sources (files), their segments
(scenes, audio windows, pages) with keyframes and clips, extractors' features and embedders' vectors;
`Store.search_media` finds segments by words and vectors (full text and cosine, fused by rank).
"""

from agent.exceptions import SchemaVersionError, StoreError
from memory._media_values import (
    CollectionInfo,
    MediaFeature,
    MediaHit,
    MediaKind,
    MediaRef,
    MediaSegment,
    MediaSource,
    NewSegment,
    SegmentKind,
)
from memory._migrations import SCHEMA_VERSION
from memory._recall import recall_tool
from memory._store import EXPORT_FORMAT, Store
from memory._values import ConversationInfo, RunInfo, SearchHit

__all__ = [
    "EXPORT_FORMAT",
    "SCHEMA_VERSION",
    "CollectionInfo",
    "ConversationInfo",
    "MediaFeature",
    "MediaHit",
    "MediaKind",
    "MediaRef",
    "MediaSegment",
    "MediaSource",
    "NewSegment",
    "RunInfo",
    "SchemaVersionError",
    "SearchHit",
    "SegmentKind",
    "Store",
    "StoreError",
    "recall_tool",
]
