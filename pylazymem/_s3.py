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
import http.client
import os
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from typing import NamedTuple

from ._errors import ObjectStoreError

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


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
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            raise ObjectStoreError("S3 endpoint %r: expected http(s)://host[:port]" % endpoint,
                                   what="endpoint")
        return cls(endpoint.rstrip("/"), region, key, secret, token)


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

    def __init__(self, config: S3Config | None = None, timeout=30.0):
        self.config = config or S3Config.from_environment()
        u = urllib.parse.urlsplit(self.config.endpoint)
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._hostport = u.netloc
        self._timeout = timeout
        self._local = threading.local()

    # ---- requests ------------------------------------------------------------------------

    def _conn(self, fresh=False):
        c = getattr(self._local, "conn", None)
        if c is None or fresh:
            if c is not None:
                c.close()
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            c = self._local.conn = cls(self._host, self._port, timeout=self._timeout)
        return c

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
                ok=(200,), what=""):
        """(status, headers, body). Non-`ok` statuses raise ObjectStoreError with S3's code.
        A dropped keep-alive connection is retried once on a new one."""
        query = dict(query or {})
        path = "/" + bucket + ("/" + key if key else "")
        body = bytes(body)
        sha = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        url = urllib.parse.quote(path, safe="/-_.~")
        if query:
            url += "?" + urllib.parse.urlencode(sorted(query.items()), quote_via=urllib.parse.quote)
        what = what or "%s s3://%s/%s" % (method, bucket, key)
        for attempt in (0, 1):
            h = self._headers(method, path, query, sha, headers)
            if body:
                h["content-length"] = str(len(body))
            try:
                c = self._conn(fresh=attempt > 0)
                c.request(method, url, body=body or None, headers=h)
                resp = c.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if attempt:
                    raise ObjectStoreError("%s: the connection to %s dropped"
                                           % (what, self.config.endpoint), what=what) from None
            except OSError as e:
                self._local.conn = None
                raise ObjectStoreError("%s: cannot reach %s: %s"
                                       % (what, self.config.endpoint, e), what=what) from None
        if resp.status not in ok:
            code, message = _error_of(data)
            hint = ""
            if resp.status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                hint = " (credentials refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            raise ObjectStoreError("%s: HTTP %d %s%s%s" % (what, resp.status, code or resp.reason,
                                                        ": " + message if message else "", hint),
                                   status=resp.status, code=code, what=what)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

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

    def get(self, bucket, key, start=None, length=None):
        """The object's bytes, or `length` bytes from `start` (a ranged GET, checked)."""
        headers = None
        if start is not None:
            headers = {"range": "bytes=%d-%d" % (start, start + length - 1)}
        _, _, data = self.request("GET", bucket, key, headers=headers,
                                  ok=(200,) if start is None else (206, 200))
        if start is not None and len(data) != length:
            if len(data) > length and start == 0:   # a server that ignored the range
                data = data[:length]
            else:
                raise ObjectStoreError("GET s3://%s/%s bytes %d+%d: got %d bytes"
                                       % (bucket, key, start, length, len(data)),
                                       what="GET " + key)
        return data

    def get_unless(self, bucket, key, etag):
        """(etag, bytes) of the object, or (etag, None) if its ETag is still `etag` (a
        conditional GET: 304 Not Modified sends no body)."""
        headers = {"if-none-match": etag} if etag else None
        status, h, data = self.request("GET", bucket, key, headers=headers, ok=(200, 304))
        if status == 304:
            return etag, None
        return h.get("etag", ""), data

    def exists(self, bucket, key):
        status, _, _ = self.request("HEAD", bucket, key, ok=(200, 404))
        return status == 200

    def delete(self, bucket, key):
        self.request("DELETE", bucket, key, ok=(200, 204, 404))

    def list_buckets(self):
        """(name, creation date) of every bucket of these credentials."""
        _, _, data = self.request("GET", "", what="list buckets")
        root = ET.fromstring(data)
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
        """Every (key, size) under prefix, all pages of ListObjectsV2."""
        out, token = [], None
        while True:
            q = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                q["continuation-token"] = token
            _, _, data = self.request("GET", bucket, query=q, what="list s3://%s/%s" % (bucket, prefix))
            root = ET.fromstring(data)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for c in root.iter(ns + "Contents"):
                out.append((c.findtext(ns + "Key"), int(c.findtext(ns + "Size") or 0)))
            if (root.findtext(ns + "IsTruncated") or "false").lower() != "true":
                return out
            token = root.findtext(ns + "NextContinuationToken")
            if not token:
                return out


def _error_of(data):
    try:
        root = ET.fromstring(data)
        return root.findtext("Code") or "", root.findtext("Message") or ""
    except ET.ParseError:
        return "", ""
