// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.widget;

import android.content.Context;

public class ScrollView extends FrameLayout {
    public ScrollView(Context context) {
        super(context);
        throw new UnsupportedOperationException("declaration only");
    }
}
