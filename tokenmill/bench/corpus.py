"""Plain English text that benchmark prompts are cut from (written for tokenmill; free to reuse).

Prompts made of real text tokenize like real traffic (word pieces, punctuation, digits), unlike random
token ids, which may be special tokens or sequences a tokenizer never produces.
"""

CORPUS = """\
The lighthouse keeper kept two logs. The first was the official one, with the wind speed, the visibility,
the number of ships that passed and the hours the lamp burned. The second was a notebook of small
observations: the gull that came every morning at a quarter past six, the way fog arrived from the south as
a wall and from the west as a slow thickening, the sound the stairs made on cold nights. After thirty years
the second notebook was the more useful of the two. It explained the first.

A kitchen during the dinner rush is a scheduling problem that nobody writes down. Orders arrive in bursts.
Some dishes take forty seconds and some take twenty minutes, and the cook cannot know in advance which
tables will order the long ones. The good cooks start the slow dishes first, keep the grill busy, and never
let the pass sit empty while a plate waits for its garnish. When the rush ends, the kitchen looks as if
nothing happened, which is the point.

In 1854 a physician mapped the cholera deaths of a London neighbourhood and noticed that they clustered
around one water pump on Broad Street. The handle of the pump was removed. The map did not prove the theory
of waterborne disease on its own, but it changed the question people asked: not whether the air was bad,
but where the water came from. Good measurements often work that way. They do not settle an argument so
much as move it somewhere more productive.

Rivers carry sediment in proportion to the square of their speed, roughly, which is why a flood can move a
boulder that a summer stream would not notice. Engineers who design bridges therefore care less about the
average flow of a river than about the worst week in a century. The average tells you how much water there
is; the extreme tells you whether the bridge is still standing on Monday.

The recipe for bread is short: flour, water, salt and yeast. The practice is long. Temperature changes how
fast the dough rises, humidity changes how much water the flour takes, and the same loaf baked in a new oven
comes out different. Bakers learn to read the dough rather than the clock. They poke it, watch how quickly
the dent fills back in, and decide.

Train timetables are promises about the tails of a distribution. A commuter does not care that the average
train is two minutes late; she cares whether the 8:14 will make her miss the connection at 8:40. Railways
that publish their punctuality as the share of trains within five minutes of schedule are, in effect,
reporting a percentile. The number hides the occasional forty-minute delay, and passengers remember the
forty minutes.

Mathematics students meet the harmonic series and learn that 1 + 1/2 + 1/3 + 1/4 and so on grows without
bound, though very slowly: the first million terms add up to a little over fourteen. The result surprises
people because every term is smaller than the one before. Intuition about sums of many small things is
unreliable, which is a useful lesson for anyone who adds up small delays.

The old telephone exchanges were sized with a formula that an engineer named Erlang worked out in 1917. Given
how many calls arrive per hour and how long each lasts, it tells you how many lines you need so that only
one caller in a hundred hears a busy signal. Doubling the traffic does not double the lines needed; larger
exchanges are more efficient because random peaks in different places tend to cancel out.

A gardener planting tomatoes in April is making a forecast. Frost in May would kill the seedlings, so she
watches the long-range weather, looks at last year's notes, and hedges by keeping a few plants indoors. The
cost of being wrong is asymmetric. Planting a week late costs a few tomatoes at the end of summer; planting a
week early can cost the whole crop.

Some programs are fast because they do little work, and some because they never wait. A web server that
handles ten thousand connections with one thread does it by never blocking: every time a request would have
to wait for the disk or the network, the server sets it aside and picks up another. The total work is the
same. What changes is that the processor is never idle while there is something it could be doing.

Libraries once lent books by stamping a card with the date the book was due. The system had no computer and
no network, and it worked for a century. Its weak point was the overdue book, which could only be found by
walking the drawer of cards and comparing dates by eye, one at a time, every week.

Sailors navigating by dead reckoning multiply speed by time and add up the legs of the voyage on a chart.
Every small error accumulates, so a careful navigator takes a fix from the sun or a known headland whenever
one is available and starts the arithmetic again from there. The fix does not make the earlier estimates
better. It stops them from getting worse.

Orchestras tune to the oboe because its pitch is steady and its tone cuts through the room. Before a concert
the oboist plays an A, the strings and winds adjust, and within a minute eighty instruments agree. The note
lasts only a few seconds, but without it the evening would sound like a crowd of soloists who happen to share
a stage.
"""
