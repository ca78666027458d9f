"""The demo's generated world: members with Chinese and English names, phones and addresses that can never
reach anyone, shoppers who order, lapse, come back and unsubscribe on a seeded random clock."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers

from engine.rules.loyalty import Loyalty

NEW_MEMBER_SHARE = 0.1  # of --members, signing up during the window (the welcome journey's audience)
DRIFT = 0.2  # chance that an order is an active member's last for a long while
BATCH = 1000
CHANNELS = ("email", "sms")


# Name and number tables read best as one string each (hence the noqa: SIM905).
SURNAMES = [w.split(":") for w in (  # noqa: SIM905
    "王:wang 李:li 张:zhang 刘:liu 陈:chen 杨:yang 黄:huang 赵:zhao 吴:wu 周:zhou 徐:xu 孙:sun 马:ma 朱:zhu "
    "胡:hu 郭:guo 何:he 高:gao 林:lin 罗:luo 郑:zheng 梁:liang 谢:xie 宋:song 唐:tang 许:xu 韩:han 冯:feng "
    "邓:deng 曹:cao 彭:peng 曾:zeng 肖:xiao 田:tian 董:dong 袁:yuan 潘:pan 蒋:jiang 蔡:cai 余:yu 杜:du 叶:ye "
    "程:cheng 苏:su 魏:wei 吕:lv 丁:ding 沈:shen 姚:yao 卢:lu 姜:jiang 崔:cui 钟:zhong 谭:tan 陆:lu 汪:wang").split()]


# A handful of surnames cover most people: weight by rank, as in the census tables.
SURNAME_WEIGHTS = [1 / (rank + 4) for rank in range(len(SURNAMES))]


GIVEN_NAMES = [w.split(":") for w in (  # noqa: SIM905
    "伟:wei 芳:fang 娜:na 敏:min 静:jing 丽:li 强:qiang 磊:lei 军:jun 洋:yang 勇:yong 艳:yan 杰:jie 娟:juan "
    "涛:tao 明:ming 超:chao 霞:xia 平:ping 刚:gang 雪:xue 琳:lin 斌:bin 颖:ying 鑫:xin 秀英:xiuying "
    "桂英:guiying 建华:jianhua 志强:zhiqiang 海燕:haiyan 丽娟:lijuan 晓东:xiaodong 子涵:zihan 浩然:haoran "
    "欣怡:xinyi 梓轩:zixuan 雨桐:yutong 思远:siyuan 佳怡:jiayi 宇航:yuhang 一鸣:yiming 诗涵:shihan "
    "文博:wenbo 俊杰:junjie 雅琪:yaqi 婷婷:tingting 晓燕:xiaoyan 美玲:meiling 家豪:jiahao 嘉欣:jiaxin").split()]


FIRST_NAMES = ("Oliver Amelia George Isla Harry Ava Jack Mia Charlie Emily James Sophie Thomas Grace "  # noqa: SIM905
               "William Lily Daniel Chloe Michael Emma Ethan Olivia Noah Hannah Lucas Zoe Samuel Ella Ruby").split()


LAST_NAMES = ("Smith Jones Taylor Brown Williams Wilson Johnson Davies Robinson Wright Thompson Evans "  # noqa: SIM905
              "Walker White Roberts Green Hall Wood Jackson Clarke Miller Davis Garcia Martinez Lee").split()


CN_MOBILE = "130 131 132 133 135 136 137 138 139 150 151 152 153 155 158 159 177 180 186 187 188".split()  # noqa: SIM905
CN_CITIES = "上海 北京 广州 深圳 杭州 成都 南京 武汉 苏州 西安 重庆 天津".split()  # noqa: SIM905


# English-speaking members: (time zone, share, mobile prefixes that libphonenumber accepts, cities)
EN_ZONES = (
    ("Europe/London", 0.45, ("+447911", "+447400", "+447480", "+447552"), ("London", "Manchester", "Leeds")),
    ("America/New_York", 0.35, ("+1212", "+1646", "+1917", "+1617"), ("New York", "Boston")),
    ("America/Los_Angeles", 0.20, ("+1213", "+1310", "+1415", "+1206"), ("Los Angeles", "San Francisco")),
)


EMAIL_DOMAINS = ("example.com", "example.net", "example.org")  # reserved names: no real inbox can receive these


# What a sent message makes members do: (journey, step) -> (chance of an order, mean days until it).
ORDERS_AFTER = {
    ("winback", "first_touch"): (0.06, 5.0), ("winback", "sms_offer"): (0.08, 2.0),
    ("birthday", "birthday_email"): (0.15, 3.0), ("welcome", "welcome_email"): (0.08, 2.0),
    ("welcome", "first_order_coupon"): (0.10, 1.5),
}


UNSUBSCRIBE_CHANCE = {"email": 0.004, "sms": 0.012}  # per message received ("回T退订")


@dataclass
class Shopper:
    """What the simulation knows about a member to decide what they do next."""

    id: str
    zone: ZoneInfo
    spend: float
    rate: float = 0.0  # ordinary orders per day
    logins: float = 0.0  # logins per day
    lapsed: bool = False
    chain: int = 0  # bumped when the pace changes, so that the orders planned at the old pace are dropped


class World:
    """The generated members and, on the simulation's clock, what each does next."""

    def __init__(self, rng: random.Random, loyalty: Loyalty, start: datetime, end: datetime) -> None:
        self.rng, self.loyalty, self.start, self.end = rng, loyalty, start, end
        self.shoppers: dict[str, Shopper] = {}
        self.joining: dict[str, dict[str, Any]] = {}  # members who sign up later in the window, not yet inserted
        self.queue: list[tuple[datetime, int, str, str, int]] = []  # (at, seq, kind, member id, chain)
        self.emails: set[str] = set()
        self.seq = 0

    # ------------------------------------------------------------------ people

    def person(self, number: int) -> dict[str, Any]:
        rng = self.rng
        if rng.random() < 0.7:
            (surname, s_py), (given, g_py) = rng.choices(SURNAMES, SURNAME_WEIGHTS)[0], rng.choice(GIVEN_NAMES)
            abroad = rng.random() < 0.1
            zone = "Asia/Singapore" if abroad else "Asia/Shanghai"
            phone = _valid_phone(rng, "+65" + rng.choice("89"), 7) if abroad else \
                _valid_phone(rng, rng.choice(CN_MOBILE), 8)  # written the Chinese way, without +86
            city = "新加坡" if abroad else rng.choice(CN_CITIES)
            raw: dict[str, Any] = {"name": surname + given, "locale": "zh-CN", "timezone": zone, "phone": phone,
                                   "city": city}
            local = rng.choice([f"{s_py}{g_py}{rng.randint(1, 999)}", f"{g_py}.{s_py}{rng.randint(60, 99)}"])
        else:
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            zone, _, prefixes, cities = rng.choices(EN_ZONES, [z[1] for z in EN_ZONES])[0]
            digits = 6 if prefixes[0].startswith("+44") else 7
            raw = {"name": f"{first} {last}", "locale": "en", "timezone": zone, "city": rng.choice(cities),
                   "phone": _valid_phone(rng, rng.choice(prefixes), digits)}
            local = f"{first}.{last}{rng.randint(1, 99)}".lower()
        email = f"{local}@{rng.choice(EMAIL_DOMAINS)}"
        while email in self.emails:
            email = f"{local}{rng.randint(100, 9999)}@{rng.choice(EMAIL_DOMAINS)}"
        self.emails.add(email)
        raw.update(id=f"M{100000 + number}", email=email if rng.random() > 0.06 else "",
                   phone=raw["phone"] if rng.random() > 0.08 else "", birthday=self._birthday(),
                   email_opt_in=rng.random() < 0.85, sms_opt_in=rng.random() < 0.65)
        return raw

    def _birthday(self) -> str:
        rng = self.rng
        if rng.random() < 0.05:
            return ""
        if rng.random() < 0.004:
            return f"{rng.choice(range(1964, 2005, 4))}-02-29"  # celebrated on 28 February in other years
        return (date(rng.randint(1962, 2006), 1, 1) + timedelta(days=rng.randint(0, 364))).isoformat()

    def history(self, raw: dict[str, Any]) -> None:
        """Sign-up, spend and last order of a member who joined in the two years before the window."""
        rng = self.rng
        tenure = rng.uniform(1, 730)
        raw["signup_at"] = (self.start - timedelta(days=tenure)).isoformat()
        roll = rng.random()
        if roll < 0.08:  # signed up, never ordered
            raw.update(total_spend=0, order_count=0, points=0, last_order_at="")
            return
        spend = round(rng.lognormvariate(7.65, 1.6) + 30, 2)  # median ~2,100: most regular, ~1% diamond
        basket = rng.lognormvariate(math.log(220), 0.35) * (1 + math.log10(1 + spend / 5000))
        lapsed = roll < 0.45 and tenure > 75
        gap = rng.uniform(61, tenure) if lapsed else rng.uniform(0, min(60, tenure))
        raw.update(total_spend=spend, order_count=max(1, round(spend / basket)),
                   points=int(spend * rng.uniform(0.1, 0.9)), last_order_at=(self.start - timedelta(days=gap))
                   .isoformat())

    def existing(self, count: int) -> Iterator[dict[str, Any]]:
        """Members already in the programme when the window opens, with their plans for the window."""
        for number in range(count):
            raw = self.person(number)
            self.history(raw)
            last = raw["last_order_at"]
            gap = (self.start - datetime.fromisoformat(last)).days if last else 999
            # The longer since the last order, the likelier the member has already drifted away.
            lapsed = gap > 60 or self.rng.random() < gap / 90
            self._enrol(raw, float(raw["total_spend"]), lapsed, self.start)
            yield raw

    def plan_signups(self, first_number: int, count: int) -> None:
        span = (self.end - self.start).total_seconds()
        for offset in range(count):
            raw = self.person(first_number + offset)
            at = self.start + timedelta(seconds=self.rng.uniform(0, span - 9 * 3600))  # still in after _awake
            raw.update(signup_at=at.isoformat(), total_spend=0, order_count=0, points=0, last_order_at="")
            self.joining[raw["id"]] = raw
            self._push(self._awake(at, ZoneInfo(raw["timezone"])), "signup", raw["id"])

    def _enrol(self, raw: dict[str, Any], spend: float, lapsed: bool, now: datetime) -> None:
        shopper = Shopper(raw["id"], ZoneInfo(raw["timezone"]), spend)
        self._pace(shopper, lapsed)
        self.shoppers[shopper.id] = shopper
        self._schedule(shopper, "order", now)
        self._schedule(shopper, "login", now)

    def _pace(self, shopper: Shopper, lapsed: bool) -> None:
        # Better customers order more often; members who drifted away rarely come back on their own.
        rank = self.loyalty.rank(self.loyalty.tier_for_spend(shopper.spend).id)
        shopper.rate = 1 / self.rng.uniform(250, 500) if lapsed else self.rng.lognormvariate(0, 0.5) * 1.5**rank / 30
        shopper.logins = 1 / 150 if lapsed else shopper.rate * 2 + 1 / 60
        shopper.lapsed, shopper.chain = lapsed, shopper.chain + 1

    # ------------------------------------------------------------------ the clock

    def _push(self, at: datetime, kind: str, member_id: str, chain: int = 0) -> None:
        if at <= self.end:
            self.seq += 1
            heapq.heappush(self.queue, (at, self.seq, kind, member_id, chain))

    def _schedule(self, shopper: Shopper, kind: str, after: datetime, mean_days: float | None = None) -> None:
        rate = shopper.rate if kind == "order" else shopper.logins
        days = self.rng.expovariate(1 / mean_days) if mean_days else self.rng.expovariate(rate)
        at = self._awake(after + timedelta(days=min(days, 3650)), shopper.zone)
        self._push(at, kind, shopper.id, shopper.chain if kind == "order" else 0)

    def _awake(self, at: datetime, zone: ZoneInfo) -> datetime:
        """People shop and log in while awake: move night-time moments to the morning, member-local."""
        hour = at.astimezone(zone).hour
        return at + timedelta(hours=8 - hour) if hour < 8 else at

    def due(self, now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Members who join and events that happen up to NOW, in time order."""
        joined: list[dict[str, Any]] = []
        happened: list[dict[str, Any]] = []
        while self.queue and self.queue[0][0] <= now:
            at, _, kind, member_id, chain = heapq.heappop(self.queue)
            if kind == "signup":
                raw = self.joining.pop(member_id)
                joined.append(raw)
                # "app" sign-ups get the A/B-tested welcome (welcome_ab); the others the classic series.
                happened.append(_event(member_id, "signup", at, {"source": self.rng.choice(
                    ["store", "mini_program", "web", "app", "app"])}))
                self._enrol(raw, 0.0, False, at)
                if self.rng.random() < 0.1:  # some order at once, before the welcome series goes on
                    self._schedule(self.shoppers[member_id], "bought", at, mean_days=1.5)
            elif kind == "login":
                via = self.rng.choice(["app", "mini_program", "web"])
                happened.append(_event(member_id, "login", at, {"via": via}))
                self._schedule(self.shoppers[member_id], "login", at)
            elif kind.startswith("unsubscribe:"):
                happened.append(_event(member_id, "unsubscribe", at, {"channel": kind.partition(":")[2]}))
            elif kind == "review":
                happened.append(_event(member_id, "review_submitted", at, {"stars": self.rng.choice((4, 5, 5, 3))}))
            elif kind == "bought" or chain == self.shoppers[member_id].chain:
                happened.append(self._order(self.shoppers[member_id], at, ordinary=kind == "order"))
        return joined, happened

    def _order(self, shopper: Shopper, at: datetime, *, ordinary: bool) -> dict[str, Any]:
        rank = self.loyalty.rank(self.loyalty.tier_for_spend(shopper.spend).id)
        amount = self.rng.lognormvariate(math.log(180 * 2.2 ** rank), 0.6)
        amount = float(max(19, int(amount) // 10 * 10 + self.rng.choice((8, 9))))  # shop prices end in 8 or 9
        shopper.spend += amount
        # A lapsed member who orders is back; any ordinary order may be the last before a member drifts away.
        changed = shopper.lapsed or (ordinary and self.rng.random() < DRIFT)
        if changed:
            self._pace(shopper, not shopper.lapsed)
        if changed or ordinary:
            self._schedule(shopper, "order", at)
        self.seq += 1
        return _event(shopper.id, "purchase", at, {"amount": amount, "order_id": f"D{self.seq:08d}"})

    def react(self, sent: list[tuple[str, str, str, str]], now: datetime) -> None:
        """Messages change behaviour: some members order after an offer, a few unsubscribe."""
        for member_id, journey, step, channel in sent:
            shopper = self.shoppers[member_id]
            chance, mean_days = ORDERS_AFTER.get((journey, step), (0.0, 1.0))
            if self.rng.random() < chance:
                self._schedule(shopper, "bought", now, mean_days=mean_days)
            if step == "ask_review" and self.rng.random() < 0.3:  # about a third write the review asked for
                self._push(now + timedelta(days=self.rng.uniform(0.2, 9)), "review", member_id)
            if self.rng.random() < UNSUBSCRIBE_CHANCE[channel]:
                self._push(now + timedelta(hours=self.rng.uniform(0.1, 6)), f"unsubscribe:{channel}", member_id)


def _valid_phone(rng: random.Random, prefix: str, digits: int) -> str:
    """PREFIX and random digits, drawn again until libphonenumber accepts the number (imports check it)."""
    for _ in range(200):
        text = prefix + "".join(rng.choice("0123456789") for _ in range(digits))
        if phonenumbers.is_valid_number(phonenumbers.parse(text, "CN")):
            return text
    raise AssertionError(f"no valid phone number starts with {prefix}")  # the prefixes above are all valid


def _event(member_id: str, kind: str, at: datetime, properties: dict[str, Any]) -> dict[str, Any]:
    return {"member_id": member_id, "type": kind, "at": at.isoformat(), "properties": properties}
