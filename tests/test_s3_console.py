"""The web console at /console in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): log in, upload a folder, download it as a zip, open a
share link logged out (and see one fail after it expired), delete with a confirmation that
names the count, and restore from the versions."""

import io
import os
import time
import urllib.error
import urllib.request
import zipfile

import pytest
from harness import wait_for

pytest.importorskip("aiohttp")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
WAIT = 20.0  # seconds for the page to do one thing
SCREENSHOT = os.environ.get("FMS_CONSOLE_SCREENSHOT")  # where to save one (docs/console.png)


@pytest.fixture(scope="module")
def site(s3_site):
    gateway = s3_site["http"]
    gateway.boto3().create_bucket(Bucket="photos")
    return gateway


@pytest.fixture
def browser(tmp_path):
    for path in (CHROMIUM, DRIVER):
        if not os.access(path, os.X_OK):
            reason = f"{path} is missing: apt-get install chromium chromium-driver"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.downloads = downloads
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield driver
    finally:
        driver.quit()


def find(driver, css: str, text: str | None = None):
    """The first element matching ``css`` (and showing ``text``), waiting for it."""

    def look():
        for e in driver.find_elements(By.CSS_SELECTOR, css):
            if e.is_displayed() and (text is None or text in e.text):
                return e
        return None

    return wait_for(look, WAIT, f"{css} {text or ''}".strip())


def status_says(driver, text: str):
    return wait_for(lambda: text in driver.find_element(By.ID, "status").text, WAIT, text)


def log_in(driver, site):
    driver.get(site.url + "/console")
    find(driver, "#key-id").send_keys(site.key_id)
    driver.find_element(By.ID, "secret").send_keys(site.secret)
    driver.find_element(By.ID, "login-btn").click()
    find(driver, "a.bucket", "photos").click()
    find(driver, "#page")


def test_console_login_upload_zip_share_delete_restore(site, browser, tmp_path):
    s3 = site.boto3()
    # a wrong secret is refused, with S3's reason
    browser.get(site.url + "/console")
    find(browser, "#key-id").send_keys(site.key_id)
    browser.find_element(By.ID, "secret").send_keys("wrong")
    browser.find_element(By.ID, "login-btn").click()
    wait_for(
        lambda: "SignatureDoesNotMatch" in browser.find_element(By.ID, "login-err").text,
        WAIT,
        "refusal",
    )

    log_in(browser, site)
    # upload a folder (with a sub-folder) through the folder picker
    album = tmp_path / "album"
    (album / "raw").mkdir(parents=True)
    files = {
        "album/a.txt": b"hello from the console\n",
        "album/b.bin": os.urandom(300_000),
        "album/raw/c.txt": b"inside a sub-folder\n",
    }
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    browser.find_element(By.ID, "folder").send_keys(str(album))
    status_says(browser, "Uploaded 3 files")
    for rel, data in files.items():
        assert s3.get_object(Bucket="photos", Key=rel)["Body"].read() == data
    # browse into it by the folder link and back by the breadcrumbs
    find(browser, "a.folder", "album/").click()
    find(browser, "tr[data-key='album/a.txt']")
    find(browser, "a.folder", "raw/").click()
    find(browser, "tr[data-key='album/raw/c.txt']")
    find(browser, "#crumbs a", "album").click()
    find(browser, "tr[data-key='album/b.bin']")
    if SCREENSHOT:
        browser.save_screenshot(SCREENSHOT)
    # preview text
    find(browser, "tr[data-key='album/a.txt'] button.preview").click()
    wait_for(lambda: "hello from the console" in find(browser, "#dlg-body").text, WAIT, "preview")
    browser.find_element(By.ID, "dlg-close").click()
    # the folder as one zip
    browser.find_element(By.ID, "zip").click()
    zipped = wait_for(
        lambda: [p for p in browser.downloads.iterdir() if p.suffix == ".zip"],
        WAIT,
        "the zip download",
    )[0]
    with zipfile.ZipFile(io.BytesIO(zipped.read_bytes())) as zf:
        assert {n: zf.read(n) for n in zf.namelist()} == {
            rel[len("album/") :]: data for rel, data in files.items()
        }
    # a share link, opened logged out; and one that expired
    find(browser, "tr[data-key='album/a.txt'] button.share").click()
    expiry = find(browser, "#share-expiry")
    assert [o.get_attribute("value") for o in expiry.find_elements(By.TAG_NAME, "option")][
        -1
    ] == str(7 * 86400)
    link = wait_for(lambda: find(browser, "#share-url").get_attribute("value"), WAIT, "share url")
    assert "X-Amz-Expires=3600" in link
    short = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "presign('GET', objectPath('photos', 'album/a.txt'), 1).then(done);"
    )
    browser.find_element(By.ID, "dlg-close").click()
    browser.find_element(By.ID, "logout").click()
    find(browser, "#login")
    browser.get(link)
    assert "hello from the console" in browser.find_element(By.TAG_NAME, "body").text
    time.sleep(2.1)  # the short link's whole life is one second: wait past it
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(short, timeout=10)
    assert err.value.code == 403 and b"Request has expired" in err.value.read()
    # overwrite a file, delete the folder (the confirmation names the count), restore
    s3.put_object(Bucket="photos", Key="album/a.txt", Body=b"second version\n")
    log_in(browser, site)
    find(browser, "tr input.sel[data-prefix='album/']").click()
    browser.find_element(By.ID, "delete").click()
    alert = wait_for(lambda: _alert(browser), WAIT, "the confirmation")
    assert alert.text == "Delete 3 objects?"
    alert.accept()
    status_says(browser, "Deleted 3 objects")
    assert "Contents" not in s3.list_objects_v2(Bucket="photos", Prefix="album/")
    find(browser, "#deleted tr", "album/a.txt").find_element(
        By.CSS_SELECTOR, "button.versions"
    ).click()
    versions = find(browser, "#version-list")
    restore = next(r for r in versions.find_elements(By.TAG_NAME, "tr") if r.text.startswith("v1"))
    restore.find_element(By.CSS_SELECTOR, "button.restore").click()
    status_says(browser, "Restored album/a.txt")
    assert s3.get_object(Bucket="photos", Key="album/a.txt")["Body"].read() == files["album/a.txt"]


def _alert(driver):
    try:
        return driver.switch_to.alert
    except Exception:
        return None


def test_console_page_is_served_without_a_key(site):
    with urllib.request.urlopen(site.url + "/console", timeout=10) as reply:
        page = reply.read()
        assert reply.headers["Content-Type"].startswith("text/html")
    assert b"fms console" in page
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(site.url + "/console/../photos/album", timeout=10)
    assert err.value.code in (403, 404)
