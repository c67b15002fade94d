"""A small S3 client for the object store (issue 13): path-style requests signed with AWS
Signature Version 4, over http.client, for `push`, `pull` and reading manifests.

Python, not the C core: nothing here runs on the fault path (faults fetch chunks natively).
Credentials and endpoint come the standard way: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(/ AWS_SESSION_TOKEN), AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_REGION or
AWS_DEFAULT_REGION; else the shared files (AWS_SHARED_CREDENTIALS_FILE, default
~/.aws/credentials, and AWS_CONFIG_FILE, default ~/.aws/config) for the profile AWS_PROFILE
(default "default"). Path-style addressing (https://endpoint/bucket/key): what Ceph's RADOS
Gateway, MinIO and AWS itself all accept.
"""
from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
import functools
import http.client
import io
import os
import re
import socket
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from typing import NamedTuple

from ._errors import ObjectStoreError

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_ERROR_BODY = 64 << 10      # of an error answer, what is read (S3's XML error is small)
MAX_LIST_BODY = 16 << 20       # one page of a listing (1000 keys)
MAX_LIST_PAGES = 100000        # 10^8 keys: a listing longer than that is taken as a loop
DEFAULT_MAX_BODY = 64 << 20    # a body whose caller gave no bound


def timeout_ms(env=None):
    """PYLAZYMEM_S3_TIMEOUT_MS (default 30000): the time one request may take, whole."""
    env = os.environ if env is None else env
    value = env.get("PYLAZYMEM_S3_TIMEOUT_MS", "")
    try:
        v = int(value) if value else 30000
    except ValueError:
        v = 0
    if not 1 <= v < (1 << 31):
        raise ValueError("PYLAZYMEM_S3_TIMEOUT_MS=%r: expected an integer from 1 to %d"
                         % (value, (1 << 31) - 1))
    return v


def _header_safe(s):
    return all(" " <= c <= "~" for c in s)


class S3Config(NamedTuple):
    endpoint: str          # scheme://host[:port]
    region: str
    access_key: str
    secret_key: str
    session_token: str = ""

    @classmethod
    def from_environment(cls, env=None) -> "S3Config":
        env = os.environ if env is None else env
        profile = env.get("AWS_PROFILE", "default")
        creds = _ini(env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), profile)
        conf = _ini(env.get("AWS_CONFIG_FILE", "~/.aws/config"),
                    profile if profile == "default" else "profile " + profile)
        key = env.get("AWS_ACCESS_KEY_ID") or creds.get("aws_access_key_id", "")
        secret = env.get("AWS_SECRET_ACCESS_KEY") or creds.get("aws_secret_access_key", "")
        token = env.get("AWS_SESSION_TOKEN") or creds.get("aws_session_token", "")
        region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or conf.get("region")
                  or "us-east-1")
        endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                    or conf.get("endpoint_url") or "https://s3.%s.amazonaws.com" % region)
        if not key or not secret:
            raise ObjectStoreError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a "
                "profile in ~/.aws/credentials); for the project's test gateway: "
                'eval "$(bash scripts/s3-server.sh env)"', what="credentials")
        u = urllib.parse.urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") \
                or u.query or u.fragment:
            raise ObjectStoreError("S3 endpoint %r: expected http(s)://host[:port]" % endpoint,
                                   what="endpoint")
        # everything that goes into a request header (or its signature) must be one line
        # of printable ASCII: http.client would refuse it with a bare ValueError
        for name, value in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret),
                            ("AWS_SESSION_TOKEN", token), ("AWS_REGION", region),
                            ("the endpoint", u.netloc)):
            if not _header_safe(value) or (name != "AWS_SECRET_ACCESS_KEY" and " " in value):
                raise ObjectStoreError("S3 credentials: %s holds a control character, space "
                                       "or non-ASCII character (a stray newline?)" % name,
                                       what="credentials")
        # A region is one path segment of the signature's scope (the native fetcher refuses
        # the rest, which would otherwise surface only at restore, and unexplained)
        if len(region) > 255 or re.search(r"[/\\?#:%\x7f]", region):
            raise ObjectStoreError("S3 region %r (AWS_REGION / AWS_DEFAULT_REGION or the config "
                                   "file): a region name has no / \\ ? # : or %% (such as "
                                   "us-east-1)" % region, what="credentials")
        # the scheme as urlsplit read it (lower case: HTTP://... is http), for the core too
        return cls("%s://%s" % (u.scheme, u.netloc), region, key, secret, token)


def _ini(path, section):
    p = configparser.ConfigParser()
    try:
        p.read(os.path.expanduser(path))
    except configparser.Error:
        return {}
    return dict(p[section]) if p.has_section(section) else {}


def parse_url(url: str):
    """s3://bucket/key... -> (bucket, key); the key may be empty. Bucket names as S3 allows
    them (3-63 of a-z, 0-9, '.', '-')."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError("not an s3:// URL: %r" % (url,))
    bucket, _, key = url[5:].partition("/")
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-"
                                                for c in bucket):
        raise ValueError("%s: bad bucket name %r (3-63 characters of a-z, 0-9, '.', '-')"
                         % (url, bucket))
    if any(part in (".", "..") for part in key.split("/")) or "//" in key:
        raise ValueError("%s: the key may not hold empty, '.' or '..' parts" % url)
    return bucket, key.strip("/")


def _sign(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class S3Client:
    """One client per configuration; safe to share between threads (one connection each)."""

    def __init__(self, config: S3Config | None = None, timeout=None):
        self.config = config or S3Config.from_environment()
        if timeout is None:   # PYLAZYMEM_S3_TIMEOUT_MS: one request, whole (not per read)
            timeout = timeout_ms() / 1000.0
        u = urllib.parse.urlsplit(self.config.endpoint)
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._hostport = u.netloc
        self._timeout = timeout
        self._local = threading.local()

    # ---- requests ------------------------------------------------------------------------

    def _conn(self, deadline, fresh=False):
        c = getattr(self._local, "conn", None)
        if c is None or fresh:
            if c is not None:
                c.close()
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            c = self._local.conn = cls(self._host, self._port, timeout=self._timeout)
        # each read of the answer waits at most until the request's deadline
        c.response_class = functools.partial(_Response, deadline=deadline)
        c.timeout = max(0.001, deadline - time.monotonic())
        if c.sock is not None:
            c.sock.settimeout(c.timeout)
        return c

    def _drop(self):
        c = getattr(self._local, "conn", None)
        self._local.conn = None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass

    def _headers(self, method, path, query, body_sha, extra):
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = {"host": self._hostport, "x-amz-date": amz_date,
                   "x-amz-content-sha256": body_sha}
        if self.config.session_token:
            headers["x-amz-security-token"] = self.config.session_token
        headers.update({k.lower(): v for k, v in (extra or {}).items()})
        names = sorted(headers)
        canonical_query = "&".join(
            "%s=%s" % (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
            for k, v in sorted(query.items()))
        canonical = "\n".join([method, urllib.parse.quote(path, safe="/-_.~"), canonical_query,
                               "".join("%s:%s\n" % (n, str(headers[n]).strip()) for n in names),
                               ";".join(names), body_sha])
        scope = "%s/%s/s3/aws4_request" % (day, self.config.region)
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        k = _sign(("AWS4" + self.config.secret_key).encode(), day)
        for part in (self.config.region, "s3", "aws4_request"):
            k = _sign(k, part)
        signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s"
            % (self.config.access_key, scope, ";".join(names), signature))
        return headers

    def request(self, method, bucket, key="", query=None, body=b"", headers=None,
                ok=(200,), what="", max_bytes=DEFAULT_MAX_BODY, size_of=None):
        """(status, headers, body). Non-`ok` statuses raise ObjectStoreError with S3's code.
        A dropped keep-alive connection is retried once on a new one. The whole request
        (both attempts) takes at most the client's timeout (PYLAZYMEM_S3_TIMEOUT_MS); a body
        longer than `max_bytes` is refused (by its Content-Length before it is read), and
        so is one that stops short of it. size_of(first 64 bytes) may bound an `ok` body
        more tightly once they are in (a manifest's header says its size). Every failure,
        an answer that is not HTTP included, is an ObjectStoreError (and the connection is
        dropped)."""
        query = dict(query or {})
        path = "/" + bucket + ("/" + key if key else "")
        body = bytes(body)
        sha = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        url = urllib.parse.quote(path, safe="/-_.~")
        if query:
            url += "?" + urllib.parse.urlencode(sorted(query.items()), quote_via=urllib.parse.quote)
        what = what or "%s s3://%s/%s" % (method, bucket, key)
        deadline = time.monotonic() + self._timeout
        for attempt in (0, 1):
            h = self._headers(method, path, query, sha, headers)
            if body:
                h["content-length"] = str(len(body))
            fresh = False
            try:
                c = self._conn(deadline, fresh=attempt > 0)
                fresh = c.sock is None
                c.request(method, url, body=body or None, headers=h)
                resp = c.getresponse()
                data = self._body(resp, method, ok, max_bytes, size_of, what)
                if resp.will_close or not resp.isclosed():
                    self._drop()   # (an error's long text, not read out)
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop()
                # a kept-alive connection the server had closed: once more on a new one
                if attempt or fresh or time.monotonic() >= deadline:
                    raise ObjectStoreError("%s: the connection to %s dropped"
                                           % (what, self.config.endpoint), what=what) from None
            except ObjectStoreError:
                self._drop()
                raise
            except (socket.timeout, TimeoutError):
                self._drop()
                raise ObjectStoreError("%s: no complete answer from %s within %.3g s "
                                       "(PYLAZYMEM_S3_TIMEOUT_MS)"
                                       % (what, self.config.endpoint, self._timeout),
                                       what=what) from None
            except OSError as e:
                self._drop()
                raise ObjectStoreError("%s: cannot reach %s: %s"
                                       % (what, self.config.endpoint, e), what=what) from None
            except (http.client.HTTPException, ValueError) as e:
                # not an HTTP answer (a bad status line, a body cut short, bad chunking...)
                self._drop()
                raise ObjectStoreError("%s: a broken answer from %s (%s: %s)"
                                       % (what, self.config.endpoint, type(e).__name__,
                                          str(e)[:200]), what=what) from None
        if resp.status not in ok:
            code, message = _error_of(data)
            hint = ""
            if resp.status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                hint = " (credentials refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            raise ObjectStoreError("%s: HTTP %d %s%s%s" % (what, resp.status, code or resp.reason,
                                                        ": " + message if message else "", hint),
                                   status=resp.status, code=code, what=what)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def _body(self, resp, method, ok, max_bytes, size_of, what):
        """The answer's body, read in pieces, bounded (see request)."""
        good = resp.status in ok
        limit = max_bytes if good else MAX_ERROR_BODY
        if method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
            resp.read()   # none (http.client knows)
            return b""
        if resp.length is not None and resp.length > limit:
            if not good:   # an error's text is not needed whole: its status says enough
                return b""
            raise ObjectStoreError("%s: the answer is %d bytes, more than the %d expected"
                                   % (what, resp.length, limit), code="ResponseTooLarge",
                                   what=what)
        buf = bytearray()
        while True:
            piece = resp.read1(min(1 << 20, limit + 1 - len(buf)))
            if not piece:
                break
            buf += piece
            if good and size_of is not None and len(buf) >= 64:
                limit = min(limit, max(int(size_of(bytes(buf[:64]))), 64))
                size_of = None
            if len(buf) > limit:
                if not good:
                    return bytes(buf[:limit])   # (the connection is dropped: not read out)
                raise ObjectStoreError("%s: the answer is longer than the %d bytes expected"
                                       % (what, limit), code="ResponseTooLarge", what=what)
        if resp.length is not None and resp.length > 0:
            raise http.client.IncompleteRead(bytes(buf[-16:]), resp.length)
        resp.close()   # read out: the connection serves the next request
        return bytes(buf)

    # ---- operations ----------------------------------------------------------------------

    def ensure_bucket(self, bucket):
        """Create the bucket where it is missing (an existing one of ours is fine)."""
        status, _, _ = self.request("HEAD", bucket, ok=(200, 404, 403), what="HEAD bucket " + bucket)
        if status == 200:
            return False
        if status == 403:
            raise ObjectStoreError("bucket %s: access denied (credentials refused, or the bucket "
                                   "belongs to someone else)" % bucket, status=403,
                                   code="AccessDenied", what="HEAD bucket " + bucket)
        self.request("PUT", bucket, ok=(200, 409), what="create bucket " + bucket)
        return True

    def put(self, bucket, key, data):
        self.request("PUT", bucket, key, body=data)

    def get(self, bucket, key, start=None, length=None, max_bytes=DEFAULT_MAX_BODY):
        """The object's bytes (at most max_bytes: a longer answer is refused), or `length`
        bytes from `start` (a ranged GET, checked)."""
        headers = None
        if start is not None:
            headers = {"range": "bytes=%d-%d" % (start, start + length - 1)}
            max_bytes = length if start else max(length, max_bytes)
        _, _, data = self.request("GET", bucket, key, headers=headers,
                                  ok=(200,) if start is None else (206, 200),
                                  max_bytes=max_bytes)
        if start is not None and len(data) != length:
            if len(data) > length and start == 0:   # a server that ignored the range
                data = data[:length]
            else:
                raise ObjectStoreError("GET s3://%s/%s bytes %d+%d: got %d bytes"
                                       % (bucket, key, start, length, len(data)),
                                       what="GET " + key)
        return data

    def get_unless(self, bucket, key, etag, max_bytes=DEFAULT_MAX_BODY, size_of=None):
        """(etag, bytes) of the object, or (etag, None) if its ETag is still `etag` (a
        conditional GET: 304 Not Modified sends no body)."""
        headers = {"if-none-match": etag} if etag else None
        status, h, data = self.request("GET", bucket, key, headers=headers,
                                       ok=(200, 304) if etag else (200,),
                                       max_bytes=max_bytes, size_of=size_of)
        if status == 304:
            return etag, None
        return h.get("etag", ""), data

    def exists(self, bucket, key):
        return self.size(bucket, key) is not None

    def size(self, bucket, key):
        """The object's length in bytes (its Content-Length; -1 if the answer has none), or
        None where there is no such object."""
        status, headers, _ = self.request("HEAD", bucket, key, ok=(200, 404))
        if status != 200:
            return None
        try:
            return int(headers.get("content-length", ""))
        except ValueError:
            return -1   # there, of a length it does not say (never a chunk's: sent again)

    def delete(self, bucket, key):
        self.request("DELETE", bucket, key, ok=(200, 204, 404))

    def list_buckets(self):
        """(name, creation date) of every bucket of these credentials."""
        _, _, data = self.request("GET", "", what="list buckets", max_bytes=MAX_LIST_BODY)
        root = _xml(data, "list buckets")
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        return [(b.findtext(ns + "Name"), b.findtext(ns + "CreationDate"))
                for b in root.iter(ns + "Bucket")]

    def remove_bucket(self, bucket):
        """Delete every object of the bucket, then the bucket (benchmarks clean up after
        themselves: the test gateway keeps its data in memory)."""
        import concurrent.futures
        keys = [k for k, _ in self.list(bucket)]
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda k: self.delete(bucket, k), keys))
        self.request("DELETE", bucket, ok=(200, 204, 404), what="delete bucket " + bucket)

    def list(self, bucket, prefix=""):
        """Every (key, size) under prefix, all pages of ListObjectsV2. A listing whose
        continuation token comes back a second time, or that runs past MAX_LIST_PAGES pages,
        is refused (ObjectStoreError), as is one that is not a listing."""
        out, token, seen = [], None, set()
        what = "list s3://%s/%s" % (bucket, prefix)
        for _ in range(MAX_LIST_PAGES):
            q = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                q["continuation-token"] = token
            _, _, data = self.request("GET", bucket, query=q, what=what, max_bytes=MAX_LIST_BODY)
            root = _xml(data, what)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            if root.tag != ns + "ListBucketResult":
                raise ObjectStoreError("%s: the answer is not a listing (<%s>)"
                                       % (what, root.tag[:60]), what=what)
            for c in root.iter(ns + "Contents"):
                k, size = c.findtext(ns + "Key"), (c.findtext(ns + "Size") or "0").strip()
                if not k or not size.isdigit():
                    raise ObjectStoreError("%s: a listing entry without a key or size" % what,
                                           what=what)
                out.append((k, int(size)))
            if (root.findtext(ns + "IsTruncated") or "false").strip().lower() != "true":
                return out
            token = root.findtext(ns + "NextContinuationToken")
            if not token:
                return out
            if token in seen:
                raise ObjectStoreError("%s: the listing repeats itself (continuation token "
                                       "%r came back)" % (what, token[:40]), what=what)
            seen.add(token)
        raise ObjectStoreError("%s: more than %d pages of listing" % (what, MAX_LIST_PAGES),
                               what=what)


class _DeadlineIO(io.RawIOBase):
    """The answer's bytes off the socket, each read waiting at most until the request's
    deadline: a server that sends a byte now and then cannot keep a request alive past it
    (a per-read socket timeout alone would be renewed by every byte)."""

    def __init__(self, sock, deadline):
        super().__init__()
        self._sock, self._deadline = sock, deadline

    def readable(self):
        return True

    def readinto(self, b):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request's deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(b)


class _Response(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()   # sock.makefile's: its reference to the socket only
        self.fp = io.BufferedReader(_DeadlineIO(sock, deadline))


def _xml(data, what):
    try:
        return ET.fromstring(data)
    except (ET.ParseError, ValueError) as e:
        raise ObjectStoreError("%s: the answer is not XML (%s)" % (what, str(e)[:100]),
                               what=what) from None


def _error_of(data):
    try:
        root = ET.fromstring(data)
        return root.findtext("Code") or "", root.findtext("Message") or ""
    except ET.ParseError:
        return "", ""
